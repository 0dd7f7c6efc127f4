"""Model registry: a name maps to a builder function; ``create_model`` is the one way in.

The families register themselves when imported, and ``keel.models`` imports them all (as timm's
``timm.models`` does): Python runs a package's ``__init__`` before any of its modules, so
whoever reaches this registry, by whatever import, finds every model in it. The registry itself
imports no family, so a family importing it closes no cycle.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: the function's name becomes the model's name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model '{fn.__name__}' is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def family_of(name: str) -> str:
    """The module that defines model ``name`` (where its timm key mapping lives too)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; `keel models` lists them")
    return _MODELS[name].__module__


def list_models(pattern: str = "") -> list[str]:
    return sorted(n for n in _MODELS if pattern in n)


def create_model(name: str, num_classes: int = 0, **kwargs) -> nn.Module:
    """Build a backbone by name. ``num_classes=0`` gives a head-less backbone whose forward is
    ``embed``; any other keyword overrides a field of the model's config (img_size, depth, ...)."""
    if name not in _MODELS:
        import difflib
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `keel models` lists them"
        raise ValueError(f"unknown model '{name}'{hint}")
    return _MODELS[name](num_classes=num_classes, **kwargs)


def model_kwargs(cfg) -> dict:
    """The create_model keywords a pretraining config (``data.img_size``, ``model.drop_path_rate``,
    ``model.global_pool``) builds its backbone with: enough to rebuild it from its card."""
    kw = {"img_size": cfg.data.img_size}
    if cfg.model.drop_path_rate:
        kw["drop_path_rate"] = cfg.model.drop_path_rate
    if cfg.model.global_pool:
        kw["global_pool"] = cfg.model.global_pool
    return kw
