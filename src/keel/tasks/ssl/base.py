"""The Method interface: a self-supervised :class:`~keel.tasks.base.Task`, a backbone plus the
heads, loss and views of one way to pretrain it.

A method makes its views from the batch's images with this process's generator
(``make_views(images_uint8_on_device, generator, sizes)``, outside autocast, no grad; ``sizes``:
each image's own (h, w) when images of several sizes share a padded canvas, else None) and its
``training_step(views)`` returns ``{"loss": ..., **logs}``; the step hooks are the Task's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from keel.config import RunConfig
from keel.tasks.base import StepRNG, Task


class Method(Task):
    name = "method"
    defaults: dict = {}     # the method's own values of the method section's keys left None

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.used: dict = {}   # method-section keys -> the values this method runs with

    def opt(self, key: str, fallback=None):
        """``method.<key>`` from the config, or the method's default when it is None (``fallback``
        for defaults computed from other values); recorded in ``used`` for the saved config."""
        value = getattr(self.cfg.method, key)
        if value is None:
            value = self.defaults[key] if fallback is None else fallback
        self.used[key] = value
        return value

    def make_batch(self, batch: dict, rng: StepRNG):
        return self.make_views(batch["images"], rng.own, batch.get("sizes"))

    def make_views(self, images: torch.Tensor, generator: torch.Generator, sizes: torch.Tensor | None = None):
        raise NotImplementedError  # abstract: every method defines its views


def default(value, fallback):
    """A config value, or a computed default when the config leaves it ``None``."""
    return fallback if value is None else value


_METHODS: dict[str, type[Method]] = {}
def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    return cls
