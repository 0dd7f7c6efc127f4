"""Feature extraction from a frozen backbone, with an optional safetensors cache.

A backbone exposes ``embed(x) -> (B, D)`` pooled features.  Datasets come in two
flavours (see :mod:`keel.data.sources`):

* in-memory: an object with ``images`` (uint8 ``(N, 3, H, W)``) and ``labels``;
* file based: a ``Dataset`` yielding ``(image or None, label, index)``, decoded
  and batched by ``keel.data.batches.load_batches`` (undecodable files are dropped).

Features always come back as float32 on the CPU, labels as int64 on the CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from keel.files import atomic_write
from keel.data.batches import load_batches

__all__ = ["extract_features", "cached_features"]


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode; restore every submodule's own flag on exit."""
    saved = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _in_memory_batches(dataset, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    images = dataset.images
    labels = torch.as_tensor(dataset.labels, dtype=torch.int64)
    if not isinstance(images, Tensor):
        images = torch.as_tensor(images)
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"dataset has {n} images but {labels.shape[0]} labels")
    # the converted tensors stand in for the dataset's own (arrays, labels of another dtype)
    for batch in load_batches(dataset, torch.arange(n).split(batch_size), device, num_workers=0,
                              resident={"images": images, "labels": labels}):
        yield batch["images"], batch["labels"]


def _loader_batches(dataset, batch_size: int, num_workers: int,
                    device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in load_batches(dataset, torch.arange(len(dataset)).split(batch_size), device, num_workers):
        images = batch["images"]
        if images.shape[0] == 0:
            continue  # every file of this batch failed to decode
        # load_batches leaves out the labels of unlabeled data, which sources mark -1 per image
        labels = batch["labels"]
        yield images, labels


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset, transform: Callable[[Tensor], Tensor],
                     batch_size: int = 256, device: str | torch.device = "cpu",
                     num_workers: int = 0, amp_dtype: torch.dtype | None = None,
                     progress: bool = False) -> tuple[Tensor, Tensor]:
    """Embed every image of ``dataset`` with ``backbone.embed``.

    Returns ``(features, labels)``: float32 ``(N', D)`` and int64 ``(N',)`` on
    the CPU, where ``N'`` counts the images that decoded (file datasets drop
    unreadable files).  The backbone is put in eval mode for the extraction and
    each submodule's train/eval flag is restored afterwards.

    ``transform(uint8 batch already on device) -> float input``.  With
    ``amp_dtype`` (e.g. ``torch.bfloat16``) the forward runs under autocast on
    the device; features are cast back to float32.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    device = torch.device(device)
    if hasattr(dataset, "images"):
        batches = _in_memory_batches(dataset, batch_size, device)
        total = (len(dataset.images) + batch_size - 1) // batch_size
    else:
        batches = _loader_batches(dataset, batch_size, num_workers, device)
        total = (len(dataset) + batch_size - 1) // batch_size
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="features", total=total, unit="batch", dynamic_ncols=True)

    feats: list[Tensor] = []
    labs: list[Tensor] = []
    with _eval_mode(backbone):
        for images, labels in batches:
            x = transform(images)
            with _autocast(device, amp_dtype):
                z = backbone.embed(x)
            if z.ndim != 2 or z.shape[0] != images.shape[0]:
                raise ValueError(f"backbone.embed must return (B, D), got {tuple(z.shape)}"
                                 f" for a batch of {images.shape[0]}")
            feats.append(z.detach().float().cpu())
            labs.append(labels.to(torch.int64).cpu())
    if not feats:
        return torch.empty(0, 0, dtype=torch.float32), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labs)


def _load_cache(path: Path) -> tuple[Tensor, Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path), device="cpu")
    missing = {"features", "labels"} - tensors.keys()
    if missing:
        raise ValueError(f"feature cache {path} lacks {sorted(missing)}")
    return tensors["features"], tensors["labels"]


def _save_cache(path: Path, features: Tensor, labels: Tensor) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(
        {"features": features.contiguous(), "labels": labels.contiguous()}, tmp,
        metadata={"num_items": str(features.shape[0]), "dim": str(features.shape[1] if features.ndim == 2 else 0)}))


def cached_features(backbone: nn.Module, dataset, transform: Callable[[Tensor], Tensor],
                    cache_path: str | Path | None, **kw) -> tuple[Tensor, Tensor]:
    """Like :func:`extract_features`, memoised in a ``.safetensors`` file.

    If ``cache_path`` exists it is loaded (safetensors only, never pickle) and
    the backbone is not run.  Otherwise features are extracted once and written
    atomically (temporary file in the same folder, then ``os.replace``).  With
    ``cache_path=None`` this is plain :func:`extract_features`.  The cache is
    keyed by path only: use a new path for a new backbone or dataset.
    """
    if cache_path is None:
        return extract_features(backbone, dataset, transform, **kw)
    path = Path(cache_path)
    if path.is_file():
        return _load_cache(path)
    features, labels = extract_features(backbone, dataset, transform, **kw)
    _save_cache(path, features, labels)
    return features, labels
