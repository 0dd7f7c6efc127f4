"""Image-text contrastive losses with learned temperatures, for one process or many.

* :class:`ClipLoss` (Radford et al. 2021): symmetric InfoNCE, cross-entropy of each image over
  all texts of the global batch and of each text over all images, at ``exp(logit_scale)``;
  ``logit_scale`` starts at log(1/0.07) and is clamped at log(100) after each optimizer step
  (:meth:`clamp_`), as open_clip does. ``local_loss=True`` scores only this process's rows against
  the gathered batch (open_clip's local loss: B/W x B logits per process instead of B x B).
* :class:`SigLipLoss` (Zhai et al. 2023): an independent sigmoid per image-text pair,
  ``-sum log sigmoid(z_ij (t <x_i, y_j> + b)) / B_local`` with z = 1 on matching pairs, -1 off them;
  ``t = exp(logit_scale)`` starts at 10 and ``b`` at -10.

Features of other processes come through :func:`keel.engine.distributed.gather_with_grad`, whose
backward sends every process its slice's gradient from all losses: with DDP's gradient average the
parameters move exactly as one process with the whole batch moves them. Both losses take
L2-normalised features.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.engine import distributed as D

MAX_LOGIT_SCALE = math.log(100.0)


class ClipLoss(nn.Module):
    def __init__(self, init_scale: float = 1 / 0.07, local_loss: bool = False, learn_scale: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict:
        scale = self.logit_scale.exp()
        n = len(image)
        all_image, all_text = D.gather_with_grad(image), D.gather_with_grad(text)
        if self.local_loss:
            per_image = scale * image @ all_text.T
            per_text = scale * text @ all_image.T
            labels = torch.arange(n, device=image.device) + n * D.rank()
        else:
            per_image = scale * all_image @ all_text.T
            per_text = per_image.T
            labels = torch.arange(len(all_image), device=image.device)
        loss = (F.cross_entropy(per_image.float(), labels) + F.cross_entropy(per_text.float(), labels)) / 2
        with torch.no_grad():
            acc = (per_image.argmax(1) == labels).float().mean()
        return {"loss": loss, "logit_scale": scale.detach(), "pair_acc": acc}


class SigLipLoss(nn.Module):
    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, learn_scale: bool = True):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learn_scale)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict:
        scale = self.logit_scale.exp()
        n = len(image)
        # this process's images against every text: the sum over all processes is every pair once
        all_text = D.gather_with_grad(text)
        logits = (scale * image @ all_text.T + self.logit_bias).float()
        signs = -torch.ones_like(logits)
        offset = n * D.rank()
        signs[torch.arange(n, device=image.device), torch.arange(n, device=image.device) + offset] = 1.0
        loss = -F.logsigmoid(signs * logits).sum() / n
        with torch.no_grad():
            acc = (logits.argmax(1) == torch.arange(n, device=image.device) + offset).float().mean()
        return {"loss": loss, "logit_scale": scale.detach(), "logit_bias": self.logit_bias.detach(), "pair_acc": acc}


def build_loss(name: str, local_loss: bool = False) -> nn.Module:
    if name == "clip":
        return ClipLoss(local_loss=local_loss)
    if name == "siglip":
        return SigLipLoss()
    raise ValueError(f"model.loss must be clip or siglip, got {name!r}")
