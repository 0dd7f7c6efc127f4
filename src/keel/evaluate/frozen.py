"""Frozen-feature evaluation of one backbone: extract features once, then kNN and linear probe."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from keel.data.views import ViewConfig, eval_transform
from keel.evaluate.features import cached_features
from keel.evaluate.knn import knn_eval
from keel.evaluate.linear import linear_probe


def make_eval_transform(img_size: int):
    v = ViewConfig()
    return partial(eval_transform, size=img_size, mean=v.mean, std=v.std)


def evaluate_frozen(backbone: nn.Module, train_ds, test_ds, img_size: int, device="cpu",
                    protocols=("knn", "linear"), ks=(20, 200), temperature: float = 0.1,
                    linear_epochs: int = 100, batch_size: int = 256, cache_dir: str | Path | None = None,
                    amp_dtype=None, progress: bool = False) -> dict:
    """Returns percent accuracies: knn_top1@k / knn_top5@k for each k, linear_top1 / linear_top5."""
    transform = make_eval_transform(img_size)
    kw = dict(batch_size=batch_size, device=device, amp_dtype=amp_dtype, progress=progress)
    cache = (lambda split: Path(cache_dir) / f"features_{split}.safetensors") if cache_dir else (lambda split: None)
    xtr, ytr = cached_features(backbone, train_ds, transform, cache("train"), **kw)
    xte, yte = cached_features(backbone, test_ds, transform, cache("test"), **kw)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    out: dict = {}
    if "knn" in protocols:
        out.update(knn_eval(xtr, ytr, xte, yte, ks=ks, temperature=temperature, num_classes=num_classes))
    if "linear" in protocols:
        out.update(linear_probe(xtr, ytr, xte, yte, num_classes=num_classes, epochs=linear_epochs,
                                device=device, progress=progress))
    return out
