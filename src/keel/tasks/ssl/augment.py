"""From a run's ``aug`` section to the view pipelines methods use: two views, or multi-crop."""
from __future__ import annotations

from dataclasses import replace

import torch

from keel.config import RunConfig
from keel.data.views import BatchAugment, ViewConfig, local_crop_size, multi_crop
from keel.tasks.ssl.base import default


def view_config(cfg: RunConfig, size: int | None = None, scale: tuple[float, float] | None = None) -> ViewConfig:
    """The SimCLR-style view of ``cfg.aug`` at ``size`` (default: data.img_size)."""
    a = cfg.aug
    return ViewConfig(size=size or cfg.data.img_size, scale=scale or (a.scale_min, 1.0), hflip=a.hflip,
                      jitter_p=a.jitter_p, brightness=a.jitter, contrast=a.jitter, saturation=a.jitter,
                      hue=a.hue, gray_p=a.gray_p, blur_p=a.blur_p)


class MultiCrop(torch.nn.Module):
    """2 global views at data.img_size, scale (aug.scale_min, 1), and ``aug.local_crops`` local views
    at ``aug.local_size``, scale (aug.local_scale_min, aug.local_scale_max). Local views are not
    blurred less or more than global ones: one ``aug`` section describes both."""

    def __init__(self, cfg: RunConfig, default_local_crops: int = 6, n_global: int = 2):
        super().__init__()
        a = cfg.aug
        self.n_global = n_global
        self.n_local = default(a.local_crops, default_local_crops)
        self.local_size = default(a.local_size, local_crop_size(cfg.data.img_size))
        base = view_config(cfg)
        self.global_augment = BatchAugment(base)
        self.local_augment = BatchAugment(replace(base, size=self.local_size,
                                                  scale=(a.local_scale_min, a.local_scale_max))) if self.n_local else None

    def forward(self, images: torch.Tensor, generator: torch.Generator | None,
                sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        return multi_crop(self.global_augment, self.local_augment, images, generator, self.n_global, self.n_local,
                          sizes)
