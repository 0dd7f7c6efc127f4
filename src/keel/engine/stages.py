"""Staged (coarse-to-fine) training, the first seed's plan: a run made of stages, each a full
training run of its own (schedule, checkpoints, metrics) that starts from the previous stage's
weights and optimizer state.

A config's ``stages`` list holds one override mapping per stage, applied on top of the rest of
the config, e.g. low resolution and few prototypes first, then the full problem::

    stages:
      - {train: {epochs: 5}, data: {img_size: 16}, method: {num_prototypes: 30}}
      - {train: {epochs: 10}, data: {img_size: 32}}

Stage i lives in ``<run>/stage<i>/`` (1-based); the last stage's backbone is exported to ``<run>/``
as well. Parameters whose name and shape match are carried over with their optimizer state
(Adam moments, momentum buffers); the others (e.g. SwAV's prototypes when their number changes)
start fresh and are listed in the stage's log. Resuming a staged run skips finished stages,
resumes the interrupted one from its last checkpoint, and starts the others from their
predecessor.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from keel.config import ConfigError, RunConfig, from_dict, merge, to_dict
from keel.viz.curves import plot_run


def stage_configs(cfg: RunConfig) -> list[RunConfig]:
    """One RunConfig per stage (just ``cfg`` when it has no stages), each checked like a config
    file: a typo in a stage is an error naming the stage."""
    if not cfg.stages:
        return [cfg]
    base = to_dict(cfg)
    base["stages"] = []
    out = []
    for i, overrides in enumerate(cfg.stages, 1):
        if not isinstance(overrides, dict):
            raise ConfigError(f"stages[{i}] must be a mapping of sections (train:, data:, ...), got {overrides!r}")
        if "stages" in overrides:
            raise ConfigError(f"stages[{i}] cannot hold stages of its own")
        try:
            stage = from_dict(RunConfig, merge(base, overrides))
        except ConfigError as e:
            raise ConfigError(f"stages[{i}]: {e}") from None
        if stage.model.name != cfg.model.name:
            raise ConfigError(f"stages[{i}] changes model.name: every stage trains the same backbone "
                              f"({cfg.model.name})")
        if "seed" not in overrides.get("train", {}):
            # distinct data orders and augmentations per stage, still fixed by the run's seed
            stage.train.seed = cfg.train.seed + 1000 * (i - 1)
        out.append(stage)
    return out


def stage_dir(run_dir: str | Path, i: int) -> Path:
    return Path(run_dir) / f"stage{i}"


def stage_finished(path: Path) -> bool:
    card = path / "card.json"
    return card.is_file() and json.loads(card.read_text()).get("finished", False)


def carry_over(method: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """Load a previous stage's checkpoint ``state`` into a new stage's method and optimizer.

    Tensors (parameters and buffers) whose name and shape match are copied; optimizer state is
    moved by parameter name (each group records its ``names``), while the new optimizer's own
    hyper-parameters (lr, weight decay) are kept. Returns ``{"carried": [...], "fresh": [...]}``.
    """
    old = state["method"]
    own = method.state_dict()
    carried = {k: v for k, v in old.items() if k in own and own[k].shape == v.shape}
    method.load_state_dict(carried, strict=False)
    fresh = sorted(k for k in own if k not in carried)

    old_opt = state["optimizer"]
    old_index = {}
    for g in old_opt["param_groups"]:
        old_index.update(zip(g.get("names", []), g["params"]))
    new_sd = optimizer.state_dict()
    moved = {}
    for g in new_sd["param_groups"]:
        for name, idx in zip(g["names"], g["params"]):
            j = old_index.get(name)
            if j is not None and j in old_opt["state"] and name in carried:
                moved[idx] = old_opt["state"][j]
    new_sd["state"] = moved
    optimizer.load_state_dict(new_sd)
    return {"carried": sorted(carried), "fresh": fresh}


def export_final(run_dir: Path, last_stage: Path, results: list[dict]) -> None:
    """The last stage's backbone and card become the run's; the card lists every stage."""
    shutil.copy2(last_stage / "backbone.safetensors", run_dir / "backbone.safetensors")
    card = json.loads((last_stage / "card.json").read_text())
    card["stages"] = [{"run_dir": r["run_dir"], "steps": r["steps"], "loss": r["loss"], "knn": r["knn"]}
                      for r in results]
    (run_dir / "card.json").write_text(json.dumps(card, indent=2))
    plot_run(joined_history([Path(r["run_dir"]) for r in results]), run_dir / "curves.png",
             title=" → ".join(f"stage {i}" for i in range(1, len(results) + 1)))


def joined_history(stage_dirs: list[Path]) -> dict:
    """Every stage's loss and kNN curve on one axis of global steps and epochs."""
    history: dict = {"loss": [], "knn": []}
    step0 = epoch0 = 0.0
    for d in stage_dirs:
        metrics = d / "metrics.jsonl"
        for line in metrics.read_text().splitlines() if metrics.is_file() else []:
            rec = json.loads(line)
            if "loss" in rec:
                history["loss"].append([step0 + rec["step"], rec["loss"]])
            if "knn_top1" in rec:
                history["knn"].append([epoch0 + rec["epoch"], rec["knn_top1"]])
        card = json.loads((d / "card.json").read_text())
        step0 += card["steps"]
        epoch0 += card["epochs"]
    return history
