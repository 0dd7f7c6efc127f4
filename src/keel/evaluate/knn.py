"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of Wu et al. 2018 ("Unsupervised feature learning via
non-parametric instance discrimination"), as used by DINO: features are
L2-normalised, each test item looks up its ``k`` most cosine-similar training
items, and every neighbour votes for its class with weight ``exp(s / T)``.
"""

from __future__ import annotations

import warnings

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from keel.evaluate.linear import _infer_num_classes, topk_hits

__all__ = ["knn_predict", "knn_eval"]


def _prepare(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int):
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(train_feats.shape)}"
                         f" and {tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError("train_labels must be (N_train,)")
    if train_labels.numel() and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes}) (unlabeled items cannot vote)")
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(device=train.device, dtype=torch.int64)
    return train, labels


def _chunk_scores(train: Tensor, labels: Tensor, chunk: Tensor, num_classes: int,
                  ks: tuple[int, ...], temperature: float) -> dict[int, Tensor]:
    """Class scores of one chunk of test items for every k in ``ks`` (already clamped)."""
    query = F.normalize(chunk.to(device=train.device, dtype=torch.float32), dim=1)
    kmax = max(ks)
    out = {}
    if kmax == 0:
        for k in ks:
            out[k] = query.new_zeros(query.shape[0], num_classes)
        return out
    sims, idx = (query @ train.t()).topk(kmax, dim=1)  # sorted, most similar first
    weights = sims.div_(temperature).exp_()
    neighbour_labels = labels[idx]
    for k in ks:
        scores = query.new_zeros(query.shape[0], num_classes)
        scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
        out[k] = scores
    return out


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk_size: int = 1024) -> Tensor:
    """Class scores ``(N_test, num_classes)`` of the temperature-weighted cosine kNN.

    For each test item the ``k`` training neighbours of highest cosine
    similarity ``s`` each add ``exp(s / temperature)`` to the score of their
    class.  ``k`` is clamped to ``N_train``.  Test items are processed
    ``chunk_size`` at a time so the similarity matrix stays small.  Work
    happens on the device of ``train_feats``; scores come back there too.
    Weights are not rescaled, so ``temperature`` below about 1/88 overflows
    float32 for near-identical neighbours.
    """
    if k < 1 or chunk_size < 1 or temperature <= 0:
        raise ValueError("k and chunk_size must be >= 1, temperature > 0")
    train, labels = _prepare(train_feats, train_labels, test_feats, num_classes)
    kk = min(int(k), train.shape[0])
    parts = [
        _chunk_scores(train, labels, test_feats[start:start + chunk_size], num_classes, (kk,),
                      temperature)[kk]
        for start in range(0, test_feats.shape[0], chunk_size)
    ]
    if not parts:
        return train.new_zeros(0, num_classes)
    return torch.cat(parts)


@torch.no_grad()
def knn_eval(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
             ks: Iterable[int] = (20, 200), temperature: float = 0.1,
             num_classes: int | None = None, chunk_size: int = 1024) -> dict:
    """Top-1 / top-5 accuracy (percent) of :func:`knn_predict` for every k in ``ks``.

    Returns ``{"knn_top1@20": ..., "knn_top5@20": ..., "knn_top1@200": ..., ...}``.
    Top-5 counts the true label among the five highest class scores; it is left out for tasks of
    five classes or fewer, where it says nothing. Ties follow ``torch.topk``. One similarity
    search with the largest k serves every k; a k larger than the memory bank (the training
    features) uses the whole bank, with a warning.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or temperature <= 0:
        raise ValueError("ks must be non-empty and >= 1, temperature > 0")
    if test_labels.shape != (test_feats.shape[0],):
        raise ValueError("test_labels must be (N_test,)")
    if num_classes is None:
        num_classes = _infer_num_classes(train_labels, test_labels)
    train, labels = _prepare(train_feats, train_labels, test_feats, num_classes)
    n_test = test_feats.shape[0]
    clamped = {k: min(k, train.shape[0]) for k in ks}
    if any(c < k for k, c in clamped.items()):
        warnings.warn(f"kNN with k={max(ks)} but only {train.shape[0]} training features in the bank: "
                      f"k={train.shape[0]} is used", stacklevel=2)
    hits = {k: {1: 0, 5: 0} for k in ks}
    for start in range(0, n_test, chunk_size):
        scores = _chunk_scores(train, labels, test_feats[start:start + chunk_size], num_classes,
                               tuple(sorted(set(clamped.values()))), temperature)
        y = test_labels[start:start + chunk_size].to(device=train.device, dtype=torch.int64)
        for k in ks:
            h = topk_hits(scores[clamped[k]], y, (1, 5))
            hits[k][1] += h[1]
            hits[k][5] += h[5]
    result = {}
    for k in ks:
        for top in (1, 5) if num_classes > 5 else (1,):
            result[f"knn_top{top}@{k}"] = 100.0 * hits[k][top] / n_test if n_test else float("nan")
    return result
