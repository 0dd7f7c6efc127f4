"""BYOL (Grill et al. 2020): an online network (backbone, projector, predictor) regresses the
projection of the other view made by a target network, an EMA of the online backbone and
projector. No negatives.

As the paper: projector and predictor are Linear -> BN -> ReLU -> Linear (hidden
``proj_hidden_dim`` / ``pred_hidden_dim`` 4096, out ``proj_dim`` 256); the target's momentum
rises from ``method.momentum`` (0.996) to 1 along a half cosine over the run, updated after each
optimizer step. Each view goes through the networks on its own (BatchNorm statistics per view).

The reported loss is the paper's symmetrized sum L + L~, each term the batch mean of
``2 - 2 cos(p, z')``, so it lies in [0, 8]. With lightly's ``NegativeCosineSimilarity``
(ncs = -mean cos): loss = 4 + 2 * (ncs(p1, z2') + ncs(p2, z1')).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import RunConfig
from keel.data.views import BatchAugment, two_views
from keel.tasks.ssl.augment import view_config
from keel.tasks.ssl.base import Method, register_method
from keel.tasks.ssl.heads import mlp_head
from keel.tasks.ssl.momentum import cosine_momentum, ema_update, momentum_copy


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Batch mean of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), in float32; ``z`` (the target) is
    detached. Per-sample mean: the mean over equal-sized shards of processes is the global one."""
    with torch.autocast(p.device.type, enabled=False):
        cos = F.cosine_similarity(p.float(), z.detach().float(), dim=1)
        return (2 - 2 * cos).mean()


@register_method
class BYOL(Method):
    name = "byol"
    defaults = dict(momentum=0.996, proj_dim=256, proj_hidden_dim=4096, pred_hidden_dim=4096)

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__(backbone, cfg)
        m = cfg.method
        self.base_momentum = self.opt("momentum")
        out = self.opt("proj_dim")
        self.projector = mlp_head([backbone.num_features, self.opt("proj_hidden_dim"), out])
        self.predictor = mlp_head([out, self.opt("pred_hidden_dim"), out])
        self.target_backbone = momentum_copy(backbone)
        self.target_projector = momentum_copy(self.projector)
        self.augment = BatchAugment(view_config(cfg))

    def make_views(self, images, generator, sizes=None):
        return two_views(self.augment, images, generator, sizes)

    def training_step(self, views) -> dict:
        x1, x2 = views
        p1 = self.predictor(self.projector(self.backbone.embed(x1)))
        p2 = self.predictor(self.projector(self.backbone.embed(x2)))
        with torch.no_grad():
            z1 = self.target_projector(self.target_backbone.embed(x1))
            z2 = self.target_projector(self.target_backbone.embed(x2))
        return {"loss": regression_loss(p1, z2) + regression_loss(p2, z1)}

    def momentum_at(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.base_momentum)

    def on_step_end(self, step: int, total_steps: int) -> None:
        # As the official code: after the optimizer step k, tau_k = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2.
        m = self.momentum_at(step, total_steps)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_projector, self.projector, m)
