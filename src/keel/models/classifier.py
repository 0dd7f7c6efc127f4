"""A backbone with a classification head: what fine-tuning trains and a teacher is.

``Classifier(backbone, head)`` computes ``head(feature_norm(backbone.embed(x)))``. A
:class:`DistilledHead` (DeiT) reads the backbone's class and distillation tokens instead.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class DistilledHead(nn.Module):
    """DeiT's two classifiers for a backbone with a distillation token: ``cls`` reads the class
    token, ``dist`` the distillation token. Train mode: ``(class logits, distillation logits)``
    (the first learns from the labels, the second from the teacher); eval mode: their average."""

    def __init__(self, cls: nn.Module, dist: nn.Module):
        super().__init__()
        self.cls = cls
        self.dist = dist

    def forward(self, cls_features: torch.Tensor, dist_features: torch.Tensor):
        a, b = self.cls(cls_features), self.dist(dist_features)
        return (a, b) if self.training else (a + b) / 2


class Classifier(nn.Module):
    """``head(feature_norm(backbone.embed(x)))``. ``feature_norm`` is a BatchNorm without affine
    parameters when asked (MAE's linear probe: the head sees standardised features, so one lr
    suits every backbone; at inference it is a fixed affine map, still a linear classifier), else
    the identity. With ``frozen_backbone`` the backbone runs without autograd. A
    :class:`DistilledHead` reads the backbone's class and distillation tokens
    (``forward_tokens``) instead of ``embed``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature_norm: bool = False,
                 frozen_backbone: bool = False):
        super().__init__()
        if isinstance(head, DistilledHead) and (feature_norm or getattr(backbone, "dist_token", None) is None):
            raise ValueError("a DistilledHead needs a backbone with a distillation token, without feature_norm")
        self.backbone = backbone
        self.feature_norm = (nn.BatchNorm1d(backbone.num_features, affine=False, eps=1e-6) if feature_norm
                             else nn.Identity())
        self.head = head
        self.frozen_backbone = frozen_backbone

    def forward(self, x: torch.Tensor):
        grad = torch.no_grad() if self.frozen_backbone else contextlib.nullcontext()
        if isinstance(self.head, DistilledHead):
            with grad:
                tokens = self.backbone.forward_tokens(x)
            return self.head(tokens[:, 0], tokens[:, 1])
        with grad:
            features = self.backbone.embed(x)
        return self.head(self.feature_norm(features))
