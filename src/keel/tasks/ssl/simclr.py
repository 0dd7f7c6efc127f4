"""SimCLR (Chen et al. 2020): two augmented views, a projection MLP, and the NT-Xent loss with
in-batch negatives gathered from every process (with gradients)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import RunConfig
from keel.data.views import BatchAugment, two_views
from keel.engine.distributed import gather_with_grad, rank
from keel.tasks.ssl.augment import view_config
from keel.tasks.ssl.base import Method, register_method


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Normalized-temperature cross-entropy over 2N views.

    Each view's positive is the other view of its image; its negatives are the 2N - 2 views of
    all other images in the global batch (every process's). Returns the mean over this
    process's 2n anchors; the mean over processes equals the loss of one process on the whole
    batch. Computed in float32 whatever the autocast dtype.
    """
    with torch.autocast(z1.device.type, enabled=False):  # under autocast the matmul would run in bf16
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        n = z1.shape[0]
        keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)])       # (2N, d), rank order
        N = keys.shape[0] // 2
        anchors = torch.cat([z1, z2])                                           # (2n, d)
        logits = anchors @ keys.T / temperature
        own = torch.arange(n, device=z1.device) + rank() * n                    # global ids of local images
        self_idx = torch.cat([own, own + N])
        pos_idx = torch.cat([own + N, own])
        logits = logits.masked_fill(F.one_hot(self_idx, 2 * N).bool(), float("-inf"))
        return F.cross_entropy(logits, pos_idx)


class ProjectionHead(nn.Module):
    """Linear -> BN -> ReLU -> Linear, SimCLR's 2-layer projector."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x):
        return self.net(x)


@register_method
class SimCLR(Method):
    name = "simclr"
    defaults = dict(temperature=0.2, proj_hidden_dim=512, proj_dim=128)

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__(backbone, cfg)
        m = cfg.method
        self.temperature = self.opt("temperature")
        self.projector = ProjectionHead(backbone.num_features, self.opt("proj_hidden_dim"),
                                        self.opt("proj_dim"))
        self.augment = BatchAugment(view_config(cfg))

    def make_views(self, images, generator, sizes=None):
        return two_views(self.augment, images, generator, sizes)

    def training_step(self, views) -> dict:
        x1, x2 = views
        # one forward over both views: twice the batch for the GPU, BN statistics over both
        z1, z2 = self.projector(self.backbone.embed(torch.cat([x1, x2]))).chunk(2)
        return {"loss": nt_xent(z1, z2, self.temperature)}
