"""Heads that methods compose (as lightly's do): MLP projectors and predictors.

``mlp_head([in, hidden, ..., out])`` builds Linear layers joined by BatchNorm + ReLU; the
choices the papers differ on (BN after the last layer, bias) are arguments.
"""
from __future__ import annotations

import torch.nn as nn


def mlp_head(dims: list[int], last_bn: bool = False, last_bn_affine: bool = True, bias: bool = False) -> nn.Sequential:
    """Linear(d0, d1) BN ReLU ... Linear(d_{n-1}, d_n) [BN].

    Hidden Linear layers have no bias (BN follows them). ``last_bn`` adds a BatchNorm after the
    output layer (SimSiam's and MoCo v3's projectors; MoCo v3 without affine parameters).
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP head needs at least input and output widths, got {dims}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=bias or (last and not last_bn)))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=last_bn_affine))
    return nn.Sequential(*layers)
