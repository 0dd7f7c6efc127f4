"""timm <-> keel state dicts, so weights on disk come in and keel-pretrained backbones go out.

Each model family keeps its own key mapping beside its architecture (as timm keeps its
``checkpoint_filter_fn``): a family module defines ``from_timm_state_dict(sd, name)`` and
``to_timm_state_dict(sd, name)``. This file only finds the family of a model name and calls it.
Nothing here downloads anything: the state dict is one the user already has.
"""
from __future__ import annotations

import importlib

import torch

from keel.models.registry import family_of


def _family_module(name: str):
    module = importlib.import_module(family_of(name))
    if not hasattr(module, "from_timm_state_dict"):
        raise ValueError(f"model '{name}' has no timm conversion (its family '{module.__name__}' defines none)")
    return module


def from_timm(name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm state dict of the counterpart of keel model ``name`` -> keel's state dict."""
    return _family_module(name).from_timm_state_dict(dict(state_dict), name)


def to_timm(name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """keel's state dict of model ``name`` -> the state dict of its timm counterpart."""
    return _family_module(name).to_timm_state_dict(dict(state_dict), name)
