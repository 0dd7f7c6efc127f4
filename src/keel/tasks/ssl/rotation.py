"""Rotation prediction (Gidaris, Singh & Komodakis 2018, "RotNet"): classify by how many
quarter turns an image was rotated.

As the paper's best variant, every image goes in all four rotations (0, 90, 180, 270 degrees)
in the same batch, so a batch of B images trains on 4B inputs; the paper found this beats one
random rotation per image. Before rotating, each image gets the standard random resized crop
and flip (``aug`` section), with no colour jitter nor grayscale (they do not change which way is
up). Label k means k * 90 degrees counter-clockwise, as ``torch.rot90(x, k, dims=(2, 3))``.
The head is a linear layer on ``backbone.embed``; the loss is cross-entropy and the step logs
``rot_acc``, the fraction of this process's inputs whose rotation was predicted right.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import RunConfig
from keel.data.views import BatchAugment
from keel.tasks.ssl.augment import view_config
from keel.tasks.ssl.base import Method, register_method


def rotate_four(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, H) -> the 4B images [x, rot90(x), rot180(x), rot270(x)] (counter-clockwise)
    and their labels [0]*B + [1]*B + [2]*B + [3]*B."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations need square images, got {tuple(x.shape[-2:])}")
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return rotated, labels


@register_method
class Rotation(Method):
    name = "rotation"

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__(backbone, cfg)
        self.head = nn.Linear(backbone.num_features, 4)
        self.augment = BatchAugment(replace(view_config(cfg), jitter_p=0.0, gray_p=0.0))

    def make_views(self, images, generator, sizes=None):
        return rotate_four(self.augment(images, generator, sizes))

    def training_step(self, views) -> dict:
        x, labels = views
        logits = self.head(self.backbone.embed(x)).float()  # the loss in float32 whatever the autocast
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        return {"loss": loss, "rot_acc": acc}
