"""CSWin Transformer (Dong et al. 2022): cross-shaped window attention with LePE in four stages.

Conv stem (7x7, stride 4) + LayerNorm, then stages of CSWin blocks with stripe widths 1, 2, 7, 7
(the last stage attends globally), joined by 3x3 stride-2 convs + LayerNorm; final LayerNorm and
average pooling. Blocks run on (B, H, W, C) maps; any input size works (stripes are padded and
masked inside the attention), and multiples of 32 give maps at exactly strides 4, 8, 16, 32.

There is no timm counterpart (timm has no CSWin), so this family defines no timm conversion.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from keel.models.layers.cross_attention import CSWinBlock
from keel.models.layers.init import init_linear_trunc_normal
from keel.models.registry import register_model


@dataclass(frozen=True)
class CSWinConfig:
    img_size: int = 224             # only recorded: any size works
    embed_dim: int = 64
    depths: tuple[int, ...] = (1, 2, 21, 1)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    split_sizes: tuple[int, ...] = (1, 2, 7, 7)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    layer_scale: float | None = None


class ConvNorm(nn.Module):
    """Conv then LayerNorm over channels: (B, C, H, W) or (B, H, W, C) in, (B, H', W', C') out.
    The stem and the down-sampling between stages."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor, channels_last_in: bool = False) -> torch.Tensor:
        if channels_last_in:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class CSWinStage(nn.Module):
    def __init__(self, cin: int, dim: int, depth: int, num_heads: int, split_size: int, rates: list[float],
                 cfg: CSWinConfig, last_stage: bool, first: bool):
        super().__init__()
        self.downsample = ConvNorm(3, dim, 7, 4, 2) if first else ConvNorm(cin, dim, 3, 2, 1)
        self.first = first
        self.blocks = nn.ModuleList(
            CSWinBlock(dim, num_heads, split_size, cfg.mlp_ratio, drop_path=r, last_stage=last_stage,
                       layer_scale=cfg.layer_scale, qkv_bias=cfg.qkv_bias)
            for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image for the first stage, else the previous stage's (B, H, W, C) map."""
        x = self.downsample(x, channels_last_in=not self.first)
        for blk in self.blocks:
            x = blk(x)
        return x


class CSWin(nn.Module):
    def __init__(self, cfg: CSWinConfig, num_classes: int = 0):
        super().__init__()
        n = len(cfg.depths)
        if not (len(cfg.num_heads) == len(cfg.split_sizes) == n):
            raise ValueError("depths, num_heads and split_sizes need one entry per stage")
        self.cfg = cfg
        # on the CPU explicitly: under a meta-device context (keel models) .tolist() would fail
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        stages, self.feature_info, cin, i = [], [], 3, 0
        for s in range(n):
            dim = cfg.embed_dim * 2 ** s
            stages.append(CSWinStage(cin, dim, cfg.depths[s], cfg.num_heads[s], cfg.split_sizes[s],
                                     rates[i:i + cfg.depths[s]], cfg, last_stage=s == n - 1, first=s == 0))
            self.feature_info.append({"stride": 4 * 2 ** s, "channels": dim})
            cin, i = dim, i + cfg.depths[s]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(cin)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes) if num_classes else nn.Identity()
        init_linear_trunc_normal(self)  # as the official code; convs keep PyTorch's default

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output (not normalized), (B, C, H, W) at strides 4, 8, 16, 32."""
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x.permute(0, 3, 1, 2).contiguous())
        return maps

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.norm(x).mean((1, 2))

    def forward(self, x):
        return self.head(self.embed(x))


def _build(cfg: CSWinConfig, num_classes: int, kwargs: dict) -> CSWin:
    return CSWin(replace(cfg, **kwargs), num_classes)


@register_model
def cswin_tiny(num_classes: int = 0, **kw) -> CSWin:
    """CSWin-T: 23M params with 1000 classes."""
    return _build(CSWinConfig(), num_classes, kw)


@register_model
def cswin_small(num_classes: int = 0, **kw) -> CSWin:
    """CSWin-S: 35M params with 1000 classes."""
    return _build(CSWinConfig(depths=(2, 4, 32, 2)), num_classes, kw)


@register_model
def cswin_base(num_classes: int = 0, **kw) -> CSWin:
    """CSWin-B: 78M params with 1000 classes."""
    return _build(CSWinConfig(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32)), num_classes, kw)
