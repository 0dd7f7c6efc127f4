"""Robustness to common corruptions: accuracy on shifted copies of a test split.

Each shift maps a uint8 batch ``(B, 3, H, W)`` to a uint8 batch of the same shape and is applied to
the decoded images *before* the evaluation transform, as a camera or a codec would. Severity 0 is
the identity; 1..5 follow the parameter values of CIFAR-10-C (Hendrycks & Dietterich, 2019):

=========  =====================================================  ==============================
shift      parameter                                               severity 1, 2, 3, 4, 5
=========  =====================================================  ==============================
noise      std of additive Gaussian noise, images in [0, 1]        0.04, 0.06, 0.08, 0.09, 0.10
blur       Gaussian sigma in pixels, x ``max(1, side / 32)``       0.4, 0.6, 0.7, 0.8, 1.0
contrast   factor c: ``mean + c * (x - mean)``, per-image mean     0.75, 0.5, 0.4, 0.3, 0.15
jpeg       JPEG quality (Pillow's encoder, its default settings)   80, 65, 58, 50, 40
=========  =====================================================  ==============================

Blur's sigma is given for 32-pixel images and scales up with larger images (side ``max(H, W)``), so
a severity blurs the same fraction of a large picture as of a CIFAR image; below 32 pixels it stays
in pixels (scaled down, a sigma under half a pixel would change nothing after rounding). The
kernel reaches ``ceil(3 sigma)`` pixels each side, with reflected borders. Noise is the only random shift:
it is drawn from a ``torch.Generator`` seeded with ``seed`` (per batch: ``seed + batch index``
in :func:`robustness`), on the CPU, so results do not depend on the device.

Two ways to score a backbone:

* :func:`robustness`: a trained classifier (e.g. ``finetune(...)["classifier"]``, which maps
  normalised images to logits), top-1 on the clean and each shifted test split;
* :func:`robustness_knn`: frozen features, kNN of the shifted test features against the *clean*
  training features (the training set is not corrupted, only what the model meets at test time).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.data.batches import load_batches
from keel.evaluate.frozen import make_eval_transform
from keel.evaluate.knn import knn_eval
from keel.evaluate.linear import accuracy_topk

__all__ = ["SHIFTS", "SEVERITY_PARAMS", "shift", "robustness", "robustness_knn"]

SHIFTS = ("noise", "blur", "contrast", "jpeg")
SEVERITY_PARAMS = {
    "noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "jpeg": (80, 65, 58, 50, 40),
}


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp_(0, 255).to(torch.uint8)


def _noise(images: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(images.shape, generator=gen, dtype=torch.float32)
    return _to_uint8(images.float().cpu() + z * (std * 255.0)).to(images.device)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur(images: torch.Tensor, sigma_at_32: float) -> torch.Tensor:
    b, c, h, w = images.shape
    sigma = sigma_at_32 * max(1.0, max(h, w) / 32.0)
    k = _gaussian_kernel(sigma).to(images.device)
    r = (len(k) - 1) // 2
    x = images.float().reshape(b * c, 1, h, w)
    # separable: rows then columns; reflect padding (replicate when the image is too small to reflect)
    mode = "reflect" if min(h, w) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return _to_uint8(x.reshape(b, c, h, w))


def _contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    x = images.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return _to_uint8(mean + factor * (x - mean))


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image
    out = []
    for img in images.cpu():
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(torch.from_numpy(np.array(decoded.convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out).to(images.device)


def shift(images: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """A shifted copy of the uint8 batch ``images`` (``(B, 3, H, W)``): ``kind`` one of
    :data:`SHIFTS`, ``severity`` 0 (a copy of the input) to 5, parameters in the module
    docstring; ``seed`` draws the noise (the other shifts are deterministic)."""
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift '{kind}' ({' | '.join(SHIFTS)})")
    if not 0 <= int(severity) <= 5:
        raise ValueError(f"severity must be 0..5, got {severity}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if severity == 0 or images.shape[0] == 0:
        return images.clone()
    p = SEVERITY_PARAMS[kind][int(severity) - 1]
    if kind == "noise":
        return _noise(images, p, seed)
    if kind == "blur":
        return _blur(images, p)
    if kind == "contrast":
        return _contrast(images, p)
    return _jpeg(images, p)


# ---------------------------------------------------------------------------------- scoring
def _batches(ds, batch_size: int, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, int64 labels) in dataset order, on the CPU where the shifts are drawn
    (undecodable files dropped, batches left empty by them skipped)."""
    index_batches = torch.arange(len(ds)).split(batch_size)
    for batch in load_batches(ds, index_batches, torch.device("cpu"), num_workers):
        images = batch["images"]
        if len(images):
            # load_batches leaves out the labels of unlabeled data, which sources mark -1 per image
            labels = batch["labels"]
            yield images, labels.to(torch.int64)


def _conditions(shifts: Sequence[str], severities: Sequence[int]) -> list[tuple[str, int]]:
    bad = [s for s in shifts if s not in SHIFTS]
    if bad:
        raise ValueError(f"unknown shift(s) {bad} ({' | '.join(SHIFTS)})")
    if any(not 1 <= int(v) <= 5 for v in severities):
        raise ValueError(f"severities must be in 1..5, got {list(severities)}")
    return [(s, int(v)) for s in shifts for v in severities]


def _nest(clean: float, by_condition: dict[tuple[str, int], float]) -> dict:
    """``{"clean", kind: {severity: top1}, "mean_shifted"}``."""
    out: dict = {"clean": clean}
    for (kind, sev), acc in by_condition.items():
        out.setdefault(kind, {})[sev] = acc
    out["mean_shifted"] = sum(by_condition.values()) / len(by_condition) if by_condition else float("nan")
    return out


def _autocast(device: torch.device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()


def _outputs(module: nn.Module, fn, test_ds, img_size: int, conditions, seed: int, batch_size: int, device,
             amp_dtype, num_workers: int) -> tuple[dict, torch.Tensor]:
    """``fn`` (``module`` or one of its methods) on the normalised clean test split and on each
    shifted copy, in eval mode (each module's train/eval flag restored afterwards):
    ``({None: clean outputs, (shift, severity): outputs, ...}, labels)``, float32 on the CPU.
    Batch ``b`` is shifted with seed ``seed + b``."""
    device = torch.device(device)
    transform = make_eval_transform(img_size)
    saved = [(m, m.training) for m in module.modules()]
    module.eval()
    outputs: dict = {c: [] for c in [None, *conditions]}
    targets = []
    try:
        for b, (images, labels) in enumerate(_batches(test_ds, batch_size, num_workers)):
            for cond in outputs:
                x = images if cond is None else shift(images, cond[0], cond[1], seed=seed + b)
                with _autocast(device, amp_dtype):
                    outputs[cond].append(fn(transform(x.to(device))).float().cpu())
            targets.append(labels)
    finally:
        for m, flag in saved:
            m.training = flag
    return {c: torch.cat(v) for c, v in outputs.items()}, torch.cat(targets)


@torch.no_grad()
def robustness(classifier: nn.Module, test_ds, img_size: int, shifts: Sequence[str] = SHIFTS,
               severities: Sequence[int] = (3,), seed: int = 0, batch_size: int = 256, device="cpu",
               amp_dtype=None, num_workers: int = 0) -> dict:
    """Top-1 (percent) of ``classifier`` (normalised ``img_size`` images -> logits, as
    :class:`keel.evaluate.finetune.Classifier`) on the clean test split and on each shifted copy:
    ``{"clean": top1, "noise": {3: top1}, ..., "mean_shifted": mean over the shifted copies}``.
    The clean number equals fine-tuning's own evaluation of the same classifier. Each module's
    train/eval flag is restored afterwards."""
    logits, y = _outputs(classifier, classifier, test_ds, img_size, _conditions(shifts, severities), seed,
                         batch_size, device, amp_dtype, num_workers)
    top1 = {c: float(accuracy_topk(v, y, (1,))[1]) for c, v in logits.items()}
    return _nest(top1.pop(None), top1)


@torch.no_grad()
def robustness_knn(backbone: nn.Module, test_ds, img_size: int, train_features: tuple[torch.Tensor, torch.Tensor],
                   shifts: Sequence[str] = SHIFTS, severities: Sequence[int] = (3,), k: int = 20,
                   temperature: float = 0.1, seed: int = 0, batch_size: int = 256, device="cpu",
                   amp_dtype=None, num_workers: int = 0) -> dict:
    """kNN top-1 (percent; ``k`` neighbours, vote temperature ``temperature``) of the shifted test
    split's features against ``train_features = (features, labels)`` of the clean training split
    (as :func:`keel.evaluate.features.extract_features` returns them). Same layout as
    :func:`robustness`; ``"clean"`` equals ``evaluate_frozen``'s ``knn_top1@k``."""
    xtr, ytr = train_features
    feats, y = _outputs(backbone, backbone.embed, test_ds, img_size, _conditions(shifts, severities), seed,
                        batch_size, device, amp_dtype, num_workers)
    num_classes = int(max(ytr.max(), y.max())) + 1
    top1 = {c: float(knn_eval(xtr, ytr, v, y, ks=(k,), temperature=temperature,
                              num_classes=num_classes)[f"knn_top1@{k}"]) for c, v in feats.items()}
    return _nest(top1.pop(None), top1)
