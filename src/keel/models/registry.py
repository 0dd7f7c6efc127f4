"""Model registry: a name maps to a builder function; ``create_model`` is the one way in."""
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
    _import_families()
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; `keel models` lists them")
    return _MODELS[name].__module__


def list_models(pattern: str = "") -> list[str]:
    _import_families()
    return sorted(n for n in _MODELS if pattern in n)


def create_model(name: str, num_classes: int = 0, **kwargs) -> nn.Module:
    """Build a backbone by name. ``num_classes=0`` gives a head-less backbone whose forward is
    ``embed``; any other keyword overrides a field of the model's config (img_size, depth, ...)."""
    _import_families()
    if name not in _MODELS:
        import difflib
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `keel models` lists them"
        raise ValueError(f"unknown model '{name}'{hint}")
    return _MODELS[name](num_classes=num_classes, **kwargs)


def _import_families() -> None:
    # Importing a family module runs its @register_model decorators.
    from keel.models import cswin, hybrid, resnet, resnetv2, swin, vit  # noqa: F401
