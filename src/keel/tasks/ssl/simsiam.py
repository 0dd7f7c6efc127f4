"""SimSiam (Chen & He 2021): one network on two views; a predictor on one side, a
stop-gradient on the other, and no negatives, no momentum encoder.

As the paper and the official code: the projector is a 3-layer MLP with BN after every layer,
the output BN without affine parameters (hidden ``proj_hidden_dim`` 2048, out ``proj_dim``
2048); the predictor a 2-layer bottleneck (hidden ``pred_hidden_dim`` 512) with BN on its hidden
layer only. Each view goes through the network on its own (BatchNorm statistics per view).

Loss: ``-(cos(p1, sg(z2)) + cos(p2, sg(z1))) / 2``, batch mean; it lies in [-1, 1], -1 when
every prediction points at the other view's projection (lightly's NegativeCosineSimilarity
gives the same value as (ncs(p1, z2) + ncs(p2, z1)) / 2).
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


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetrized negative cosine, in float32. The projections ``z`` are the targets and get
    no gradient from the term they are the target of (the stop-gradient); here both are
    detached, so the gradient reaches the projector only through the predictions ``p``."""
    with torch.autocast(p1.device.type, enabled=False):
        c1 = F.cosine_similarity(p1.float(), z2.detach().float(), dim=1).mean()
        c2 = F.cosine_similarity(p2.float(), z1.detach().float(), dim=1).mean()
        return -(c1 + c2) / 2


@register_method
class SimSiam(Method):
    name = "simsiam"
    defaults = dict(proj_hidden_dim=2048, proj_dim=2048, pred_hidden_dim=512)

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__(backbone, cfg)
        m = cfg.method
        hidden, out = self.opt("proj_hidden_dim"), self.opt("proj_dim")
        self.projector = mlp_head([backbone.num_features, hidden, hidden, out], last_bn=True, last_bn_affine=False)
        self.predictor = mlp_head([out, self.opt("pred_hidden_dim"), out])
        self.augment = BatchAugment(view_config(cfg))

    def make_views(self, images, generator, sizes=None):
        return two_views(self.augment, images, generator, sizes)

    def training_step(self, views) -> dict:
        x1, x2 = views
        z1 = self.projector(self.backbone.embed(x1))
        z2 = self.projector(self.backbone.embed(x2))
        return {"loss": simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2)}
