"""Batches of a dataset on the device, from lists of indices: the one place data is loaded.

Built-in datasets live in memory (``.images``, ``.labels``) and are indexed directly; image folders
and label files are decoded by DataLoader workers. Undecodable files are reported to ``skipped`` (index -> reason)
and either dropped (a batch can then come out smaller, or empty) or, with ``refill``, replaced by
the batch's decodable images, so that every batch keeps its size: processes under torchrun step
together and compiled graphs keep a static shape.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from keel.data.errors import DataError
from keel.data.folders import collate_skip


def load_batches(ds, index_batches: Iterable[torch.Tensor], device: torch.device, num_workers: int = 2,
                 refill: bool = False, skipped: dict[int, str] | None = None,
                 resident: dict[str, torch.Tensor] | None = None, index: bool = False) -> Iterator[dict]:
    """``{"images": uint8 (B, 3, H, W), "labels": ... (when the data has labels)}`` on ``device``
    (a dataset whose ``collate_fn`` gives a list of images of their own sizes and ``"targets"``, one
    dict of tensors per image, as detection does, gets both moved as they are)
    for each tensor of indices, in order. ``resident``: the in-memory dataset's tensors to index
    instead of ``ds.images``/``ds.labels`` (e.g. already on the device, so not copied each step).
    ``index``: add ``"index"``, each row's position in ``ds`` (on the CPU), which tells the rows
    apart once undecodable files are dropped. Images of several sizes (training's whole images)
    come padded into one canvas with ``"sizes"``, each image's (h, w), on the CPU."""
    index_batches = list(index_batches)
    if hasattr(ds, "images"):
        tensors = resident or {"images": ds.images, "labels": getattr(ds, "labels", None)}
        for idx in index_batches:
            out = {}
            for key, t in tensors.items():
                if t is not None:
                    out[key] = t[idx.to(t.device)].to(device, non_blocking=True)
            if index:
                out["index"] = idx
            yield out
        return
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=[b.tolist() for b in index_batches], num_workers=num_workers,
        collate_fn=getattr(ds, "collate_fn", collate_skip), pin_memory=device.type == "cuda",
        persistent_workers=False)
    for idx, batch in zip(index_batches, loader):
        yield finish_batch(batch, len(idx), device, refill, skipped, index)


def finish_batch(batch: dict, wanted: int, device: torch.device, refill: bool = False,
                 skipped: dict[int, str] | None = None, index: bool = False) -> dict:
    """A collated batch (see :func:`keel.data.folders.collate_skip`) of ``wanted`` items made ready:
    skipped files reported, refilled when asked, moved to ``device``."""
    if skipped is not None:
        skipped.update(zip(batch["skipped"].tolist(), batch.get("reasons") or ["cannot decode"] * len(batch["skipped"])))
    images, labels, rows = batch["images"], batch.get("labels"), batch.get("index")
    targets = batch.get("targets")   # detection: one dict of tensors per image
    sizes = batch.get("sizes")       # images of their own sizes in one padded canvas
    if refill and len(images) < wanted:
        if len(images) == 0:
            raise DataError(f"no image of a batch of {wanted} could be decoded ({len(skipped or ())} files "
                            "skipped so far): are these really images?")
        keep = torch.arange(wanted) % len(images)
        images = images[keep] if torch.is_tensor(images) else [images[i] for i in keep.tolist()]
        labels = labels[keep] if labels is not None else None
        rows = rows[keep] if rows is not None else None
        targets = [targets[i] for i in keep.tolist()] if targets is not None else None
        sizes = sizes[keep] if sizes is not None else None
    out = {"images": _to(images, device)}
    if sizes is not None:   # stays on the CPU: crop boxes are drawn there
        out["sizes"] = sizes
    if targets is not None:
        out["targets"] = _to(targets, device)
    if labels is not None:   # an unlabeled folder's are -1
        out["labels"] = labels.to(device, non_blocking=True)
    if index:
        out["index"] = rows
    return out


def _to(x, device: torch.device):
    """Tensors, and lists/dicts of them (images of different sizes, detection targets), to ``device``."""
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to(v, device) for v in x]
    return x
