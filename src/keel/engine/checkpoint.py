"""Checkpoints and artifacts.

Training checkpoints (``checkpoints/last.pt``) hold everything needed to continue exactly:
model and optimizer state, the step, the metric history. They are written atomically (a temp
file in the same folder, fsync, rename) so a crash mid-write never destroys the last good one,
and read with ``weights_only=True`` so a checkpoint can never execute code.

The exported artifact is ``backbone.safetensors`` + ``card.json``: the contract between
pretraining and everything downstream.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from keel.files import atomic_write
from keel.models.registry import create_model


def write_json(path: str | Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at '{path}'")
    return torch.load(path, map_location=map_location, weights_only=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a training checkpoint to resume: ``checkpoints/last.pt``, or the
    pointer ``checkpoints/last.json`` of a sharded one (train.parallel=fsdp)."""
    ckpt = Path(run_dir) / "checkpoints"
    return (ckpt / "last.pt").is_file() or (ckpt / "last.json").is_file()


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(model: nn.Module, path: str | Path, meta: dict) -> None:
    """``model``'s state dict as a safetensors file (atomically), ``meta`` as its string metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()}))


def export_backbone(backbone: nn.Module, run_dir: str | Path, card: dict) -> Path:
    """Write ``backbone.safetensors`` and ``card.json`` (with the weights' sha256) to run_dir."""
    run_dir = Path(run_dir)
    weights = run_dir / "backbone.safetensors"
    save_weights(backbone, weights, {"format": "pt"})
    card = dict(card, sha256=sha256(weights), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    atomic_write(run_dir / "card.json", lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2)))
    return weights


def read_card(path: str | Path) -> tuple[Path, dict]:
    """``path`` is a run directory, a backbone.safetensors or a card.json -> (weights, card)."""
    path = Path(path)
    if path.is_dir():
        weights, card_path = path / "backbone.safetensors", path / "card.json"
    elif path.suffix == ".json":
        weights, card_path = path.with_name("backbone.safetensors"), path
    else:
        weights, card_path = path, path.with_name("card.json")
    if not weights.is_file():
        raise FileNotFoundError(f"no backbone weights at '{weights}' (expected a run directory or a .safetensors file)")
    if not card_path.is_file():
        raise FileNotFoundError(f"'{weights}' has no card.json beside it, so the model it belongs to is unknown")
    return weights, json.loads(card_path.read_text())


def load_backbone(path: str | Path, map_location="cpu", verify: bool = True) -> nn.Module:
    """Rebuild the backbone a card describes and load its weights (safetensors: no code runs)."""
    weights, card = read_card(path)
    if verify and card.get("sha256") and sha256(weights) != card["sha256"]:
        raise ValueError(f"'{weights}' does not match the sha256 in its card.json: the file was changed or damaged")
    model = create_model(card["model"], **card.get("model_kwargs", {}))
    model.load_state_dict(load_file(weights, device=str(map_location)))
    return model
