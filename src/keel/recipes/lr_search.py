"""Choosing the fine-tuning learning rate on a held-out part of the training set.

``keel.jobs.finetune.run_finetune`` does this when ``recipe.lr_search`` lists learning rates (per 256 images, keel's
unit), and ``recipe.name=bit`` asks for it when the user sets no ``train.lr``: BiT-HyperRule fixes the lr at
0.003 per 512 images, a value tuned for large models pretrained on ImageNet-21k or JFT at 128-480
px. Measured here (BENCHMARKS.md, HyperRule), a small backbone pretrained on a team's own images
needs 3-10x more, so keel's ``recipe.name=bit`` keeps every other choice of the rule and picks the lr
from :data:`BIT_LR_GRID`, half-decade steps around BiT's value.

The search:

1. holds out ``recipe.lr_search_holdout`` of the training images (:func:`holdout_split`: the same
   fraction of every class, seeded by ``train.seed``; the test split is never looked at);
2. fine-tunes a fresh copy of the backbone with each candidate lr and otherwise the same config
   on the rest, and scores the last epoch on the held-out images by the task's main metric;
3. returns the config with the best lr (ties: the smaller lr), trained by the caller on the whole
   training set.

Files, under ``run_dir/lr-search/``: ``config.yaml`` (the config that asked for the search),
``scores.json`` (written after every candidate: ``{"holdout", "scores": {lr: metric}, "chosen"}``)
and one finetune run directory per candidate (``lr<value>``; its ``checkpoints/`` go once it is
scored, its classifier and curves stay). A resumed search
(``keel finetune --resume RUN_DIR``) keeps the candidates already scored and resumes the one that
was running from its last epoch checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from keel.config import ConfigError, override, save_config
from keel.engine.checkpoint import has_checkpoint, write_json
from keel.engine import distributed as D

__all__ = ["BIT_LR_GRID", "SEARCH_DIR", "holdout_split", "search_lr", "search_config_path"]

BIT_LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)   # per 512 images, BiT's unit; 0.003 is BiT's own
SEARCH_DIR = "lr-search"


def _stratum(dataset) -> torch.Tensor | None:
    """The class of each image to keep in proportion: the label, a two-level file's primary
    label, or None for multi-label images (split at random)."""
    labels = torch.as_tensor(dataset.labels)
    if labels.ndim == 1:
        return labels
    if getattr(dataset, "kind", "") == "twolevel":
        return labels[:, 0]
    return None


def holdout_split(dataset, fraction: float, seed: int = 0):
    """``(fit, held_out)`` subsets of ``dataset``: ``round(fraction * n_c)`` images of every class
    ``c`` held out (at least one when ``n_c >= 2``, never a class's last image), in an order fixed
    by ``seed``. Multi-label images are held out at random, ``round(fraction * n)`` of them."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"lr_search_holdout is a fraction in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    n = len(dataset)
    stratum = _stratum(dataset)
    if stratum is None:
        held = torch.randperm(n, generator=gen)[:min(n - 1, round(fraction * n))]
    else:
        parts = []
        for c in sorted(set(stratum.tolist())):
            ix = (stratum == c).nonzero().flatten()
            take = min(len(ix) - 1, max(1, round(fraction * len(ix))))
            parts.append(ix[torch.randperm(len(ix), generator=gen)[:take]])
        held = torch.cat(parts)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    if not mask.any():                  # a class's last image always stays: only empty is possible
        raise ConfigError(f"{n} training images are too few to hold out {fraction:g} of them for the lr search")
    return dataset.subset(torch.arange(n)[~mask]), dataset.subset(torch.arange(n)[mask])


def _read_scores(path: Path, holdout: int, resume: bool) -> dict:
    """The scores of a stopped search with the same held-out split (resume), else a new record."""
    if resume and path.is_file():
        record = json.loads(path.read_text())
        if record.get("holdout") == holdout:
            return record
    return {"holdout": holdout, "scores": {}, "chosen": None}


def search_lr(cfg, train_ds, objective, run_dir: str | Path, fit_fn, progress: bool = True, resume: bool = False):
    """Try each lr of ``cfg.recipe.lr_search`` (see the module docstring) and return ``(cfg with
    the best lr and an empty lr_search, record)``; ``record`` is what ``scores.json`` holds.
    ``fit_fn(cfg, fit, held, objective, run_dir, resume) -> result`` trains one candidate (the
    fine-tuning job's); ``objective``: None for single-label classification. ``resume``: keep the
    scores already in ``run_dir/lr-search/scores.json``."""
    lrs = sorted({float(v) for v in cfg.recipe.lr_search})
    if not lrs:
        raise ConfigError("recipe.lr_search is empty: list the learning rates to try")
    root = Path(run_dir) / SEARCH_DIR
    fit, held = holdout_split(train_ds, cfg.recipe.lr_search_holdout, cfg.train.seed)
    writes = D.rank() == 0
    path = root / "scores.json"
    record = _read_scores(path, len(held), resume)
    if writes:
        root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, root / "config.yaml")
    base = override(cfg, {"recipe.lr_search": [], "train.eval_every": 0})
    for i, lr in enumerate(lrs):
        key = f"{lr:g}"
        if key in record["scores"]:
            continue
        if progress:
            print(f"lr search {i + 1}/{len(lrs)}: lr {key} per 256, trained on {len(fit):,} images, "
                  f"scored on {len(held):,} held out")
        cand_dir = root / f"lr{key}"
        res = fit_fn(override(base, {"train.lr": lr}), fit, held, objective, cand_dir,
                     resume and has_checkpoint(cand_dir))
        record["scores"][key] = res["final"][res["main_metric"]]
        record["metric"] = res["main_metric"]
        if writes:
            write_json(path, record)
            # scored: its resumable state (model, optimizer) is no longer needed, only its files
            shutil.rmtree(cand_dir / "checkpoints", ignore_errors=True)
    # the best score; among equal ones the smallest lr (lrs are in increasing order)
    best = max(lrs, key=lambda v: (record["scores"][f"{v:g}"], -v))
    record["chosen"] = best
    if writes:
        write_json(path, record)
    if progress:
        table = ", ".join(f"{k}: {v:.2f}" for k, v in record["scores"].items())
        print(f"lr search ({record['metric']} on the held-out images): {table} -> lr {best:g} per 256, "
              f"now trained on all {len(train_ds):,} training images")
    return override(cfg, {"train.lr": best, "recipe.lr_search": []}), record


def search_config_path(run_dir: str | Path) -> Path:
    """Where a run's lr search keeps the config that asked for it."""
    return Path(run_dir) / SEARCH_DIR / "config.yaml"

