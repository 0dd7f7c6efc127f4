"""From a config to a finished run: build data, backbone and method, then fit."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from keel.config import ConfigError, RunConfig, override, save_config, to_dict
from keel.data.decode import count_decodable
from keel.data.sources import DataError, is_shards, labeled_splits, training_data
from keel.engine import distributed as D
from keel.engine.checkpoint import export_backbone, has_checkpoint
from keel.engine.hooks import EMAHook, KnnMonitor
from keel.engine.stages import export_final, stage_configs, stage_dir, stage_finished
from keel.engine.trainer import Trainer
from keel.models.registry import create_model, family_of, model_kwargs
from keel.models.vit import POOLS
from keel.tasks.ssl import build_method
from keel.version import __version__


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
    """Run ``cfg`` (every stage of it, if it has ``stages``); returns the last stage's result."""
    D.init_distributed(cfg.train.device)
    # one name for every process (the default holds the time, which processes read apart)
    run_dir = Path(D.broadcast_object(str(run_dir or default_run_dir(cfg))))
    stages = stage_configs(cfg)
    for scfg in stages:                 # a model/size pair that cannot work fails before any file is made
        check_model(scfg)
    if not cfg.stages:
        return _train(cfg, run_dir, resume, quiet)
    if resume and not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"nothing to resume in '{run_dir}' (no config.yaml)")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    results, prev = [], None
    for i, scfg in enumerate(stages, 1):
        sdir = stage_dir(run_dir, i)
        if resume and stage_finished(sdir):
            card = json.loads((sdir / "card.json").read_text())
            results.append({"run_dir": str(sdir), "steps": card["steps"], "loss": card["metrics"]["final_loss"],
                            "knn": card["metrics"]["knn_top1"]})
        else:
            if not quiet:
                print(f"stage {i}/{len(stages)}")
            partial = resume and has_checkpoint(sdir)
            results.append(_train(scfg, sdir, partial, quiet, init_from=None if partial else prev))
        prev = sdir
    export_final(run_dir, prev, results)
    return dict(results[-1], run_dir=str(run_dir), stages=results)


def check_model(cfg: RunConfig) -> None:
    """Build the backbone on the meta device (no memory, no weights) and run one image of
    ``data.img_size`` through it: a model/size pair that cannot work is a one-line error now."""
    check_pooling(cfg)
    try:
        with torch.device("meta"):
            model = create_model(cfg.model.name, **model_kwargs(cfg))
            model.eval().embed(torch.empty(2, 3, cfg.data.img_size, cfg.data.img_size))
    except (ValueError, RuntimeError, AssertionError) as e:
        raise ConfigError(f"model.name={cfg.model.name} at data.img_size={cfg.data.img_size}: "
                          f"{str(e).splitlines()[0]}") from None


def check_pooling(cfg: RunConfig) -> None:
    pool = cfg.model.global_pool
    if pool and family_of(cfg.model.name) != "keel.models.vit":
        raise ConfigError(f"model.global_pool={pool}: only ViT and DeiT models have a choice of feature; "
                          f"{cfg.model.name} always averages its last map (leave model.global_pool unset)")
    if pool and pool not in POOLS:
        raise ConfigError(f"model.global_pool must be token (the class token) or avg (mean of the patch "
                          f"tokens), got {pool!r}")


def export_run(cfg: RunConfig, method, n_images: int, result: dict, steps_per_epoch: int, run_dir: Path) -> None:
    """The run's backbone.safetensors and card.json, the contract with everything downstream."""
    card = {
        "model": cfg.model.name,
        "model_kwargs": model_kwargs(cfg),
        "method": cfg.method.name,
        "data": {"source": cfg.data.source, "images": n_images, "skipped": result["skipped"],
                 "img_size": cfg.data.img_size},
        "epochs": result["steps"] / steps_per_epoch,
        "steps": result["steps"],
        "finished": result["finished"],
        "config": to_dict(cfg),
        "metrics": {"final_loss": result["loss"], "knn_top1": result["knn"]},
        "keel_version": __version__,
    }
    backbone = method.export_backbone() if hasattr(method, "export_backbone") else method
    export_backbone(backbone, run_dir, card)


def _count(data) -> str:
    """'1797 images', or for files '13 files, 6 decodable' (the others are skipped and listed)."""
    if hasattr(data, "shards"):
        return f"{len(data)} images in {len(data.shards)} shards"
    if getattr(data, "paths", None) is None:
        return f"{len(data)} images"
    good = count_decodable(data.paths)
    return f"{len(data)} files" + (f", {good} decodable" if good is not None else "")


def build_pretraining(cfg: RunConfig, **model_extra) -> tuple[torch.nn.Module, RunConfig]:
    """The method on ``cfg``'s backbone, seeded as ``keel pretrain`` builds it, and ``cfg`` with the
    values the method runs with (its defaults filled in: what config.yaml records). ``model_extra``:
    more ``create_model`` keywords (benchmarks' model sizes)."""
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg.method.name, create_model(cfg.model.name, **model_kwargs(cfg), **model_extra), cfg)
    return method, override(cfg, {f"method.{k}": v for k, v in method.used.items()})


def _train(cfg: RunConfig, run_dir: Path, resume: bool, quiet: bool, init_from: Path | None = None) -> dict:
    """Everything is checked (data, model, method) before the first step runs."""
    check_pooling(cfg)
    with D.main_first():            # rank 0 walks a folder and writes files.json; the others read it
        data = training_data(cfg.data.source, cfg.data.img_size, cfg.data.crop_from, cfg.data.subset,
                             cfg.train.seed, cfg.data.shuffle_buffer, file_list=Path(run_dir) / "files.json",
                             exclude=cfg.data.exclude)
    splits = monitor_data(cfg) if cfg.train.knn_every and not is_shards(cfg.data.source) else None
    hooks = [KnnMonitor(splits, cfg.train.knn_every, cfg.data.img_size, max(cfg.eval.knn_k), cfg.eval.knn_t,
                        cfg.train.knn_subset, cfg.eval.batch_size)] if splits else []
    method, cfg = build_pretraining(cfg)
    backbone = method.backbone
    trainer = Trainer(cfg, run_dir, resume=resume, quiet=quiet)
    if not quiet and trainer.dist.is_main:
        n_params = sum(p.numel() for p in backbone.parameters()) / 1e6
        print(f"{cfg.method.name} · {cfg.model.name} ({n_params:.1f}M) · {cfg.data.source}: {_count(data)}"
              f" · {cfg.train.epochs} epoch{'s' if cfg.train.epochs != 1 else ''} · batch {cfg.train.batch_size} · {trainer.device}"
              f" × {trainer.dist.world_size} → {trainer.run_dir}")
    ema = EMAHook(method.export_backbone(), cfg.train.model_ema) if cfg.train.model_ema > 0 else None
    result = trainer.fit(method, data, hooks + ([ema] if ema else []), init_from=init_from)
    if trainer.is_main:
        export_run(cfg, method, len(data), result, trainer.steps_per_epoch_, run_dir)
        if ema is not None:   # the EMA's backbone is a run of its own: any command takes <run>/ema
            export_run(cfg, ema.ema, len(data), result, trainer.steps_per_epoch_, run_dir / "ema")
    D.barrier()
    return result
