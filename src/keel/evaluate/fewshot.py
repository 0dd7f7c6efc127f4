"""Few-shot transfer: k labeled images per class, several random draws, mean and spread.

For each number of shots and each draw, a training set of exactly ``shots`` images per class is
sampled (:func:`sample_shots`) and each protocol is scored on the full test split:

* ``knn`` and ``linear`` run on features extracted once for the whole training and test splits
  (:func:`keel.evaluate.features.cached_features`; with ``cache_dir`` the files are those
  ``evaluate_frozen`` writes, so one cache serves both);
* ``finetune`` trains a fresh copy of the backbone on the sampled images with
  :func:`keel.jobs.finetune.finetune` and reports the last epoch (no epoch is picked on the
  test split).

Draw ``d`` depends on ``(seed, d)`` only, and within a draw the images of each class are taken
in one fixed random order, so the 1-shot set of a draw is part of its 5-shot set and so on:
more shots only ever add images, which keeps the curves over shots smooth.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from keel.evaluate.features import cached_features
from keel.config import FinetuneConfig, override
from keel.jobs.finetune import finetune
from keel.tasks.classify import ClassificationTask
from keel.evaluate.frozen import make_eval_transform
from keel.evaluate.knn import knn_eval
from keel.evaluate.linear import linear_probe

__all__ = ["sample_shots", "fewshot", "fewshot_finetune_config", "PROTOCOLS"]

PROTOCOLS = ("knn", "linear", "finetune")


def _draw_seed(seed: int, draw: int) -> int:
    # splitmix64-style mixing: distinct, stable seeds per (seed, draw) without Python's hash()
    h = (seed * 0x9E3779B97F4A7C15 + draw + 1) & ((1 << 64) - 1)
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (h ^ (h >> 31)) & ((1 << 63) - 1)


def sample_shots(labels, shots: int, draws: int, seed: int = 0,
                 num_classes: int | None = None) -> list[torch.Tensor]:
    """``draws`` index sets (sorted int64 tensors), each with exactly ``shots`` indices of every
    class. Classes are ``0 .. num_classes - 1`` when given (a class without images is then an
    error too), else the labels present (>= 0; -1 marks unlabeled images, never sampled).
    Raises ValueError naming the classes that have fewer than ``shots`` images."""
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if shots < 1 or draws < 1:
        raise ValueError(f"shots and draws must be >= 1, got {shots} and {draws}")
    classes = range(num_classes) if num_classes is not None else sorted(set(labels[labels >= 0].tolist()))
    members = {c: (labels == c).nonzero().flatten() for c in classes}
    if not members:
        raise ValueError("no labeled images to sample from")
    short = {c: len(ix) for c, ix in members.items() if len(ix) < shots}
    if short:
        listed = ", ".join(f"class {c} has {n}" for c, n in list(short.items())[:5])
        more = f" (and {len(short) - 5} more classes)" if len(short) > 5 else ""
        raise ValueError(f"{shots}-shot sampling needs {shots} images of every class: {listed}{more}")
    out = []
    for d in range(draws):
        gen = torch.Generator().manual_seed(_draw_seed(seed, d))
        # a full permutation per class whatever ``shots``: fewer shots are a prefix of more shots
        picks = [ix[torch.randperm(len(ix), generator=gen)[:shots]] for ix in members.values()]
        out.append(torch.cat(picks).sort().values)
    return out


def fewshot_finetune_config(img_size: int, device: str = "auto", **overrides) -> FinetuneConfig:
    """The default few-shot fine-tuning schedule: 50 epochs (a few steps each on sets this small),
    5 of warm-up (at most a quarter of the run), fine-tuning's default batch and lr (a set smaller
    than the batch is one batch), evaluated after the last epoch only.
    ``overrides``: ``{"section.key": value}``."""
    cfg = override(FinetuneConfig(), {"data.img_size": img_size, "train.epochs": 50, "train.warmup_epochs": 5.0,
                                      "train.eval_every": 0, "train.device": device})
    return override(cfg, overrides) if overrides else cfg


def _summary(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single draw) of per-draw results."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "values": [float(v) for v in values]}


def fewshot(backbone: nn.Module, train_ds, test_ds, shots: Sequence[int] = (1, 5, 10, 25), draws: int = 3,
            protocols: Sequence[str] = PROTOCOLS, img_size: int | None = None, seed: int = 0,
            knn_k: int = 20, knn_t: float = 0.1, linear_epochs: int = 100,
            finetune_cfg: FinetuneConfig | None = None, device: str = "cpu", batch_size: int = 256,
            cache_dir: str | Path | None = None, progress: bool = False) -> dict:
    """Top-1 accuracy (percent) per protocol and number of shots:
    ``{protocol: {shots: {"mean", "std", "values"}}}``, ``values`` being the per-draw results in
    draw order and ``std`` their sample standard deviation (ddof=1).

    ``knn`` votes among the ``min(knn_k, images)`` nearest sampled images (temperature ``knn_t``);
    ``linear`` is :func:`keel.evaluate.linear.linear_probe` for ``linear_epochs`` epochs;
    ``finetune`` uses ``finetune_cfg`` (default :func:`fewshot_finetune_config`) with its seed
    replaced per draw. ``backbone`` itself is never trained.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown} ({' | '.join(PROTOCOLS)})")
    img_size = int(img_size or train_ds.img_size)
    train_labels = torch.as_tensor(train_ds.labels, dtype=torch.int64)
    test_labels = torch.as_tensor(test_ds.labels, dtype=torch.int64)
    num_classes = max(int(train_labels.max()), int(test_labels.max())) + 1
    samples = {s: sample_shots(train_labels, s, draws, seed, num_classes) for s in shots}

    if "knn" in protocols or "linear" in protocols:
        transform = make_eval_transform(img_size)
        kw = dict(batch_size=batch_size, device=device, progress=progress)
        cache = (lambda split: Path(cache_dir) / f"features_{split}.safetensors") if cache_dir else (lambda split: None)
        xtr, ytr = cached_features(backbone, train_ds, transform, cache("train"), **kw)
        xte, yte = cached_features(backbone, test_ds, transform, cache("test"), **kw)
        if len(ytr) != len(train_ds):
            raise ValueError(f"{len(train_ds) - len(ytr)} training images could not be decoded, so features and "
                             "dataset indices do not line up: remove the unreadable files first")
    if "finetune" in protocols:
        fcfg = finetune_cfg or fewshot_finetune_config(img_size, device=device)
        task = ClassificationTask(num_classes, fcfg.task.label_smoothing)

    per_draw: dict[str, dict[int, list[float]]] = {p: {s: [] for s in shots} for p in protocols}
    jobs = [(s, d) for s in shots for d in range(draws)]
    if progress:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc="few-shot", unit="draw", dynamic_ncols=True)
    for s, d in jobs:
        idx = samples[s][d]
        draw_seed = _draw_seed(seed, d)
        if "knn" in protocols:
            k = min(knn_k, len(idx))
            acc = knn_eval(xtr[idx], ytr[idx], xte, yte, ks=(k,), temperature=knn_t, num_classes=num_classes)
            per_draw["knn"][s].append(acc[f"knn_top1@{k}"])
        if "linear" in protocols:
            acc = linear_probe(xtr[idx], ytr[idx], xte, yte, num_classes=num_classes, epochs=linear_epochs,
                               device=device, seed=draw_seed % (1 << 31))
            per_draw["linear"][s].append(acc["linear_top1"])
        if "finetune" in protocols:
            res = finetune(copy.deepcopy(backbone), train_ds.subset(idx), test_ds,
                           override(fcfg, {"train.seed": draw_seed % (1 << 31)}), task=task, progress=False)
            per_draw["finetune"][s].append(res["final"][task.main_metric])
    return {p: {s: _summary(v) for s, v in by_shots.items()} for p, by_shots in per_draw.items()}
