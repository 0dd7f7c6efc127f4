"""MoCo v3 (Chen, Xie & He 2021): a query encoder (backbone, projector, predictor) against a
momentum key encoder (EMA of backbone and projector), with a symmetric InfoNCE loss whose
negatives are the other keys of the global batch (no queue).

As the official code:

* projector: 3-layer MLP (hidden ``proj_hidden_dim`` 4096, out ``proj_dim`` 256), BN after every
  layer, the last one without affine parameters; predictor: 2-layer MLP (hidden
  ``pred_hidden_dim`` 4096, out ``proj_dim``), same BN pattern (the ViT recipe);
* each view goes through the networks on its own, so BatchNorm statistics are per view;
* keys are gathered from every process without gradient (they come from the momentum encoder);
* each contrastive term is multiplied by 2T (the official code's scaling, which keeps the
  gradient scale independent of the temperature);
* the momentum rises from ``method.momentum`` (0.99) to 1 along a half cosine over the run;
* a backbone with a ``patch_embed`` (ViT, Swin) has it frozen: the paper found that a fixed
  random patch projection removes the training instability (loss spikes) of ViTs. keel's ViT
  initializes it like the official code (Xavier-uniform, as a linear layer).

Left out: the official ViT's fixed 2D sin-cos position embedding (keel's ViTs learn theirs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import RunConfig
from keel.data.views import BatchAugment, two_views
from keel.engine.distributed import gather_with_grad, rank
from keel.tasks.ssl.augment import view_config
from keel.tasks.ssl.base import Method, register_method
from keel.tasks.ssl.heads import mlp_head
from keel.tasks.ssl.momentum import cosine_momentum, ema_update, momentum_copy


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v3's ``ctr(q, k)``: cross-entropy of ``q_i`` against all keys of the global batch,
    the positive being ``k_i``; mean over this process's n queries, times ``2 * temperature``.

    ``k`` is this process's (n, d) keys; they are gathered from all processes without gradient.
    The mean over processes equals the loss of one process on the whole batch. Computed in
    float32, with autocast off (under autocast a matmul would run in bf16/fp16).
    """
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        with torch.no_grad():
            # under no_grad the gather records no backward: a plain all_gather, (N, d) in rank order
            keys = gather_with_grad(F.normalize(k.float(), dim=1))
        logits = q @ keys.T / temperature
        labels = torch.arange(len(q), device=q.device) + rank() * len(q)
        return F.cross_entropy(logits, labels) * (2 * temperature)


def freeze_patch_embed(backbone: nn.Module) -> bool:
    """Stop training the patch projection of a backbone that has one; True if it did."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if not isinstance(patch_embed, nn.Module):
        return False
    for p in patch_embed.parameters():
        p.requires_grad_(False)
    return True


@register_method
class MoCoV3(Method):
    name = "mocov3"
    defaults = dict(temperature=0.2, momentum=0.99, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096)

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__(backbone, cfg)
        m = cfg.method
        self.temperature = self.opt("temperature")
        self.base_momentum = self.opt("momentum")
        hidden, out = self.opt("proj_hidden_dim"), self.opt("proj_dim")
        self.frozen_patch_embed = freeze_patch_embed(backbone)  # before the copy: both frozen
        self.projector = mlp_head([backbone.num_features, hidden, hidden, out], last_bn=True, last_bn_affine=False)
        self.predictor = mlp_head([out, self.opt("pred_hidden_dim"), out], last_bn=True,
                                  last_bn_affine=False)
        self.momentum_backbone = momentum_copy(backbone)
        self.momentum_projector = momentum_copy(self.projector)
        self.augment = BatchAugment(view_config(cfg))

    def make_views(self, images, generator, sizes=None):
        return two_views(self.augment, images, generator, sizes)

    def training_step(self, views) -> dict:
        x1, x2 = views
        q1 = self.predictor(self.projector(self.backbone.embed(x1)))
        q2 = self.predictor(self.projector(self.backbone.embed(x2)))
        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_backbone.embed(x1))
            k2 = self.momentum_projector(self.momentum_backbone.embed(x2))
        t = self.temperature
        return {"loss": contrastive_loss(q1, k2, t) + contrastive_loss(q2, k1, t)}

    def momentum_at(self, step: int, total_steps: int) -> float:
        return cosine_momentum(step, total_steps, self.base_momentum)

    def on_step_end(self, step: int, total_steps: int) -> None:
        # The official code updates the key encoder at the start of step s with the momentum of
        # step s; doing it here, after the optimizer step of s - 1, with that same value gives
        # identical keys and leaves the encoder up to date in checkpoints.
        m = self.momentum_at(step + 1, total_steps)
        ema_update(self.momentum_backbone, self.backbone, m)
        ema_update(self.momentum_projector, self.projector, m)
