"""From a config to a finished run: build data, backbone and method, then fit."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from keel.config import RunConfig
from keel.data.sources import DataError, build_dataset, labeled_splits
from keel.engine.trainer import Trainer, model_kwargs
from keel.methods.base import build_method
from keel.models.registry import create_model


def default_run_dir(cfg: RunConfig) -> Path:
    name = cfg.train.run_name or "-".join([
        cfg.method.name, cfg.model.name, Path(cfg.data.source).name or "data", time.strftime("%Y%m%d-%H%M%S")])
    return Path(cfg.train.out_dir) / name


def monitor_data(cfg: RunConfig):
    """Labeled train/test splits for the kNN monitor, or None when the data has no labels."""
    try:
        return labeled_splits(cfg.data.source, cfg.data.img_size)
    except DataError:
        return None


def pretrain(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False, quiet: bool = False) -> dict:
    """Everything is checked (data, model, method) before the first step runs."""
    data = build_dataset(cfg.data.source, "train", cfg.data.img_size, labeled=False,
                         subset=cfg.data.subset, seed=cfg.train.seed)
    monitor = monitor_data(cfg) if cfg.train.knn_every else None
    torch.manual_seed(cfg.train.seed)
    backbone = create_model(cfg.model.name, **model_kwargs(cfg))
    method = build_method(cfg.method.name, backbone, cfg)
    trainer = Trainer(cfg, run_dir or default_run_dir(cfg), resume=resume, quiet=quiet)
    if not quiet and trainer.dist.is_main:
        n_params = sum(p.numel() for p in backbone.parameters()) / 1e6
        print(f"{cfg.method.name} · {cfg.model.name} ({n_params:.1f}M) · {cfg.data.source}: {len(data)} images"
              f" · {cfg.train.epochs} epoch{'s' if cfg.train.epochs != 1 else ''} · batch {cfg.train.batch_size} · {trainer.device}"
              f" × {trainer.dist.world_size} → {trainer.run_dir}")
    return trainer.fit(method, data, monitor)
