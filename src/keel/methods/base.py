"""The Method interface: a backbone plus the heads, loss and views of one way to pretrain it.

The trainer calls, per step::

    method.on_step_start(step, steps_per_epoch, total_steps)       # schedules (temperatures, ...)
    views = method.make_views(images_uint8_on_device, generator)   # outside autocast, no grad
    out = method(views)                                             # = training_step, under autocast
    out["loss"].backward()
    method.before_optimizer_step(step, steps_per_epoch)             # e.g. freeze SwAV's prototypes
    optimizer.step()
    method.on_step_end(step, total_steps)                           # EMA teachers

Every hook gets the global step, so a resumed run calls them exactly as an unbroken one.
State a method keeps across steps (queues, centres, teachers) lives in buffers or submodules:
it is saved in checkpoints and restored on resume. Extra entries of ``out`` (floats or 0-d
tensors) are logged next to the loss.

``forward`` is ``training_step`` so that DDP and ``torch.compile`` wrap the method as a whole.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from keel.config import RunConfig


class Method(nn.Module):
    name = "method"

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    def make_views(self, images: torch.Tensor, generator: torch.Generator):
        raise NotImplementedError  # abstract: every method defines its views

    def training_step(self, views) -> dict:
        raise NotImplementedError  # abstract: every method defines its loss

    def forward(self, views) -> dict:
        return self.training_step(views)

    def export_backbone(self) -> nn.Module:
        """The network that is exported and monitored: the trained backbone, or for methods whose
        teacher is the better model (DINO), the teacher's."""
        return self.backbone

    def on_step_start(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        """Hook for per-step schedules, called before the views are made; nothing by default."""

    def before_optimizer_step(self, step: int, steps_per_epoch: int) -> None:
        """Hook between backward and the optimizer step (gradients exist); nothing by default."""

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Hook for EMA teachers, after the optimizer step; nothing by default."""


def default(value, fallback):
    """A config value, or the method's own default when the config leaves it ``None``."""
    return fallback if value is None else value


_METHODS: dict[str, type[Method]] = {}
_FAMILIES = ("simclr", "swav", "mae", "simmim", "dino", "mocov3", "byol", "simsiam", "rotation")


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    import importlib
    for name in _FAMILIES:  # importing a method's module registers it
        importlib.import_module(f"keel.methods.{name}")
    return sorted(_METHODS)


def build_method(name: str, backbone: nn.Module, cfg: RunConfig) -> Method:
    names = list_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown method '{name}' (available: {', '.join(names)})")
    return _METHODS[name](backbone, cfg)
