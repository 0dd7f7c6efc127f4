"""Vision Transformer (Dosovitskiy et al. 2021): patch embedding, class token, pre-norm blocks.

Attention runs through ``F.scaled_dot_product_attention``; the absolute position embedding is
interpolated (bicubic) when the input size differs from the one the model was built for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.models.layers import Attention, DropPath, Mlp
from keel.models.registry import register_model


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    global_pool: str = "token"      # token: the class token | avg: mean of patch tokens


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, num_classes: int = 0):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim)
        self.grid = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, cfg.dim))
        # on the CPU explicitly: under a meta-device context (keel models) .tolist() would fail
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.num_features = cfg.dim
        self.feature_info = [{"stride": cfg.patch_size, "channels": cfg.dim}]
        self.head = nn.Linear(cfg.dim, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer, like MAE
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        if h == self.grid and w == self.grid:
            return self.pos_embed
        pe = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalized tokens (B, 1 + N, D), class token first."""
        h, w = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        x = self.patch_embed(x) + self.pos_embed_for(h, w)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        t = self.forward_tokens(x)
        return t[:, 0] if self.cfg.global_pool == "token" else t[:, 1:].mean(1)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        t = self.forward_tokens(x)[:, 1:]
        return [t.transpose(1, 2).reshape(len(t), -1, h, w)]

    def forward(self, x):
        return self.head(self.embed(x))


def _build(cfg: ViTConfig, num_classes: int, kwargs: dict) -> VisionTransformer:
    return VisionTransformer(replace(cfg, **kwargs), num_classes)


@register_model
def vit_tiny_patch16(num_classes: int = 0, **kw):
    return _build(ViTConfig(dim=192, num_heads=3), num_classes, kw)


@register_model
def vit_small_patch16(num_classes: int = 0, **kw):
    return _build(ViTConfig(dim=384, num_heads=6), num_classes, kw)


@register_model
def vit_base_patch16(num_classes: int = 0, **kw):
    return _build(ViTConfig(), num_classes, kw)


@register_model
def vit_tiny_patch4_32(num_classes: int = 0, **kw):
    """ViT-Tiny for 32 px images: patch 4 (8x8 tokens), 6 blocks — a small ViT for CPU runs."""
    return _build(ViTConfig(img_size=32, patch_size=4, dim=192, depth=6, num_heads=3), num_classes, kw)
