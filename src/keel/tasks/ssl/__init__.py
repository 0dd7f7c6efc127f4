"""Self-supervised methods, one module each; importing this package registers them all."""
from __future__ import annotations

import torch.nn as nn

from keel.config import RunConfig
from keel.tasks.ssl import byol, dino, mae, mocov3, rotation, simclr, simmim, simsiam, swav  # noqa: F401
from keel.tasks.ssl.base import _METHODS, Method


def list_methods() -> list[str]:
    return sorted(_METHODS)


def build_method(name: str, backbone: nn.Module, cfg: RunConfig) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method '{name}' (available: {', '.join(list_methods())})")
    return _METHODS[name](backbone, cfg)
