"""The kNN monitor the trainer runs every few epochs: one number that says whether
pretraining is still improving the features."""
from __future__ import annotations

import torch

from keel.evaluate.frozen import make_eval_transform
from keel.evaluate.features import extract_features
from keel.evaluate.knn import knn_eval


def _limit(ds, n: int, seed: int = 0):
    if not n or len(ds) <= n:
        return ds
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ds.subset(keep)


@torch.no_grad()
def knn_monitor(backbone, splits, img_size: int, k: int, t: float, subset: int, batch_size: int, device,
                amp_dtype=None) -> float:
    """kNN top-1 (%) with ``k`` neighbours, on at most ``subset`` images per split."""
    train_ds, test_ds = (_limit(d, subset) for d in splits)
    transform = make_eval_transform(img_size)
    kw = dict(batch_size=batch_size, device=device, amp_dtype=amp_dtype)
    xtr, ytr = extract_features(backbone, train_ds, transform, **kw)
    xte, yte = extract_features(backbone, test_ds, transform, **kw)
    return knn_eval(xtr, ytr, xte, yte, ks=(k,), temperature=t)[f"knn_top1@{k}"]
