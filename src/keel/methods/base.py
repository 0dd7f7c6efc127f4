"""The Method interface: a backbone plus the heads, loss and views of one way to pretrain it.

The trainer calls, per step::

    views = method.make_views(images_uint8_on_device, generator)   # outside autocast
    out = method(views)                                             # = training_step, under autocast
    out["loss"].backward(); optimizer.step(); method.on_step_end(step, total_steps)

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

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Hook for EMA teachers and per-step schedules; nothing by default."""


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    from keel.methods import simclr  # noqa: F401  (registers)
    return sorted(_METHODS)


def build_method(name: str, backbone: nn.Module, cfg: RunConfig) -> Method:
    names = list_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown method '{name}' (available: {', '.join(names)})")
    return _METHODS[name](backbone, cfg)
