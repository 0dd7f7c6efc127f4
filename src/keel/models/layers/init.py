"""Weight initialisation shared by the models and the methods' heads."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float = 1.0, mean: float = 0.0, a: float = -2.0, b: float = 2.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``tensor`` with N(mean, std²) truncated to [a, b] (absolute bounds, as in PyTorch),
    by the inverse CDF: one uniform draw per value, mapped through erfinv.

    Why not ``nn.init.trunc_normal_``: PyTorch changed its sampler between releases (2.14 draws
    normals and rejects those out of bounds; earlier releases use the inverse CDF), so the same
    seed gave other weights on another PyTorch. This sampler gives the same weights from the same
    seed on every supported release, and the same as timm's, lightly's and the official DINO and
    MAE code, so a keel run and a reference run of a seed start from the same weights."""
    if tensor.is_meta:       # sizing a model (keel models): no values, and meta erfinv is slow
        return tensor

    def cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1, generator=generator)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0)).add_(mean)
    return tensor.clamp_(min=a, max=b)  # erfinv of ±1 (the float ends) is ±inf


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """Every nn.Linear below ``module``: truncated-normal weights, zero bias (ViT / Swin / CSWin
    convention); other layers keep PyTorch's defaults."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
