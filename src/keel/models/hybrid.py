"""The seeds' own backbone: a 4-stage hierarchy of EfficientNetV2-like conv blocks nested with
Transformer blocks (``keel_tiny``, ``keel_small``, ``keel_base``).

- A convolutional stem turns the image into tokens at stride 4 (two 3x3 stride-2 convs).
- Between stages a 3x3 stride-2 convolution halves the resolution and doubles the channels.
- The early, high-resolution stages are convolutional: Fused-MBConv, then MBConv with SE, as in
  EfficientNetV2 (local features are what convolutions do best and cheapest there).
- The later stages are Transformer blocks nested with convolution. Per stage the attention is
  ``shifted_window_conv`` (Swin's shifted windows, with a depth-wise conv over the map before
  Q/K/V), ``cross_shaped`` (CSWin's horizontal + vertical stripes) or ``global`` (one window over
  the whole map at the model's resolution); the position encoding is ``rel_bias`` (a learned
  bias per relative offset) or ``lepe`` (a depth-wise conv on V added to the attention output).
  The seed reports the two encodings equal for classification and LePE better for dense tasks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from keel.models.layers.conv import ConvNormAct, FusedMBConv, MBConv
from keel.models.layers.cross_attention import CSWinBlock
from keel.models.layers.init import init_linear_trunc_normal
from keel.models.layers.window_attention import SwinBlock
from keel.models.registry import register_model

ATTENTIONS = ("shifted_window_conv", "cross_shaped", "global")
POSITIONS = ("rel_bias", "lepe")


@dataclass(frozen=True)
class HybridConfig:
    img_size: int = 224
    widths: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    # stage kinds: "fused" (Fused-MBConv), "mbconv" (MBConv + SE), "transformer"
    kinds: tuple[str, ...] = ("fused", "mbconv", "transformer", "transformer")
    expand_ratios: tuple[float, ...] = (2, 4, 0, 0)   # for the conv stages
    attention: tuple[str, ...] = ("shifted_window_conv", "global")  # one per transformer stage
    pos: str = "rel_bias"
    window: int = 7
    split_size: int = 7                                # stripe width for cross_shaped
    head_dim: int = 32
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    layer_scale: float | None = None


class Downsample(nn.Module):
    """3x3 stride-2 conv doubling the channels, then BN (conv stages) or LayerNorm (attention)."""

    def __init__(self, cin: int, cout: int, layer_norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1)
        self.norm = nn.LayerNorm(cout) if layer_norm else nn.BatchNorm2d(cout)
        self.layer_norm = layer_norm

    def forward(self, x):  # NCHW -> NCHW
        x = self.conv(x)
        if self.layer_norm:
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(x)


class TransformerStage(nn.Module):
    """Transformer blocks on a (B, H, W, C) map; takes and returns NCHW like the conv stages."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        return x.permute(0, 3, 1, 2)


def _attention_block(cfg: HybridConfig, attention: str, dim: int, grid: int, index: int, drop_path: float) -> nn.Module:
    heads = max(1, dim // cfg.head_dim)
    common = dict(mlp_ratio=cfg.mlp_ratio, drop_path=drop_path, layer_scale=cfg.layer_scale)
    lepe = cfg.pos == "lepe"
    if attention == "cross_shaped":
        if not lepe:
            raise ValueError("cross_shaped attention takes pos='lepe' (stripes have no fixed window for a bias table)")
        return CSWinBlock(dim, heads, cfg.split_size, last_stage=grid <= cfg.split_size, **common)
    if attention == "shifted_window_conv":
        window = cfg.window
        shift = window // 2 if index % 2 else 0
        return SwinBlock(dim, heads, window, shift, rel_pos=not lepe, lepe=lepe, conv_qkv=True, **common)
    if attention == "global":  # one window over the whole map at the model's resolution
        return SwinBlock(dim, heads, grid, 0, rel_pos=not lepe, lepe=lepe, conv_qkv=False, **common)
    raise ValueError(f"unknown attention '{attention}' ({' | '.join(ATTENTIONS)})")


class HybridNet(nn.Module):
    def __init__(self, cfg: HybridConfig, num_classes: int = 0):
        super().__init__()
        if len({len(cfg.widths), len(cfg.depths), len(cfg.kinds), len(cfg.expand_ratios)}) != 1:
            raise ValueError("widths, depths, kinds and expand_ratios need one entry per stage")
        if cfg.pos not in POSITIONS:
            raise ValueError(f"unknown pos '{cfg.pos}' ({' | '.join(POSITIONS)})")
        n_attn = sum(k == "transformer" for k in cfg.kinds)
        attention = (cfg.attention,) * n_attn if isinstance(cfg.attention, str) else tuple(cfg.attention)
        if len(attention) != n_attn:
            raise ValueError(f"attention needs one entry per transformer stage ({n_attn}), got {attention}")
        self.cfg = cfg
        w0 = cfg.widths[0]
        self.stem = nn.Sequential(ConvNormAct(3, w0 // 2, 3, 2), ConvNormAct(w0 // 2, w0, 3, 2))
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        self.downsamples, self.stages, self.feature_info = nn.ModuleList(), nn.ModuleList(), []
        cin, stride, i, a = w0, 4, 0, 0
        for s, (kind, width, depth, expand) in enumerate(zip(cfg.kinds, cfg.widths, cfg.depths, cfg.expand_ratios)):
            if s > 0:
                stride *= 2
                self.downsamples.append(Downsample(cin, width, layer_norm=kind == "transformer"))
            else:
                self.downsamples.append(nn.Identity())
            grid = cfg.img_size // stride
            if kind == "fused":
                stage = nn.Sequential(*(FusedMBConv(width, width, 1, expand, drop_path=rates[i + d]) for d in range(depth)))
            elif kind == "mbconv":
                stage = nn.Sequential(*(MBConv(width, width, 1, expand, drop_path=rates[i + d]) for d in range(depth)))
            elif kind == "transformer":
                stage = TransformerStage([_attention_block(cfg, attention[a], width, grid, d, rates[i + d])
                                          for d in range(depth)])
                a += 1
            else:
                raise ValueError(f"unknown stage kind '{kind}' (fused | mbconv | transformer)")
            self.stages.append(stage)
            self.feature_info.append({"stride": stride, "channels": width})
            cin, i = width, i + depth
        self.num_features = cin
        self.norm = nn.LayerNorm(cin) if cfg.kinds[-1] == "transformer" else nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes) if num_classes else nn.Identity()
        init_linear_trunc_normal(self)

    def feature_maps(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                     mask_token: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each stage's output, (B, C, H, W) at strides 4, 8, 16, 32. ``mask`` (B, H/4, W/4) bool
        with ``mask_token`` (widths[0],): SimMIM's input masking, the stem's output where ``mask``
        is True is replaced by the token before the first stage."""
        x = self.stem(x)
        if mask is not None:
            x = torch.where(mask.unsqueeze(1), mask_token.reshape(1, -1, 1, 1).to(x.dtype), x)
        maps = []
        for down, stage in zip(self.downsamples, self.stages):
            x = stage(down(x))
            maps.append(x)
        return maps

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """SimMIM's encoder: the last map of :meth:`feature_maps` (masked as there), normalized
        position by position by the final norm (which ``embed`` applies after pooling when it is
        a LayerNorm), (B, C, H/32, W/32)."""
        x = self.feature_maps(x, mask, mask_token)[-1]
        if isinstance(self.norm, nn.LayerNorm):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feature_maps(x)[-1]
        if isinstance(self.norm, nn.LayerNorm):
            return self.norm(x.mean((2, 3)))
        return self.norm(x).mean((2, 3))

    def forward(self, x):
        return self.head(self.embed(x))


def _build(cfg: HybridConfig, num_classes: int, kwargs: dict) -> HybridNet:
    return HybridNet(replace(cfg, **kwargs), num_classes)


# Sizes fit under Swin's budgets at 224 px (params with a 1000-class head / GMACs):
# tiny <= 28M / 4.5, small <= 50M / 8.7, base <= 88M / 15.5.
@register_model
def keel_tiny(num_classes: int = 0, **kw) -> HybridNet:
    """23.4M params, 3.6 GMACs at 224 px (with a 1000-class head)."""
    return _build(HybridConfig(widths=(64, 128, 320, 640), depths=(2, 3, 8, 2)), num_classes, kw)


@register_model
def keel_small(num_classes: int = 0, **kw) -> HybridNet:
    """44.5M params, 7.8 GMACs at 224 px."""
    return _build(HybridConfig(widths=(96, 192, 384, 768), depths=(2, 2, 14, 2)), num_classes, kw)


@register_model
def keel_base(num_classes: int = 0, **kw) -> HybridNet:
    """78.8M params, 13.9 GMACs at 224 px."""
    return _build(HybridConfig(widths=(128, 256, 512, 1024), depths=(2, 2, 14, 2)), num_classes, kw)
