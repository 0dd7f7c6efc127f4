"""CSWin's cross-shaped window self-attention (Dong et al. 2022) and the block built on it.

Half of the heads (and channels) attend within vertical stripes of width ``split_size`` that
span the full height, the other half within horizontal stripes of that height spanning the full
width; together a token sees a cross. Channel/head order follows the official code: the first
half of the channels are the vertical-stripe branch, the second half the horizontal one. In the
last stage (``last_stage=True``) a single branch with all heads attends over the whole map.

LePE is applied as in the official ``get_lepe``: the depth-wise 3x3 conv runs on V cut into the
same stripes the attention uses (zero padding at every stripe border), not on the whole map, so
a token's position term only mixes values it can also attend to.

Maps whose side is not a multiple of ``split_size`` are zero-padded on the bottom/right of the
stripe axis only; padded positions are masked out as keys (boolean ``attn_mask``) and their V is
zero, so LePE sees them like the conv's own zero padding. The result for real tokens equals
attention within stripes clipped at the image border. A side shorter than ``split_size`` simply
makes the stripe that side long (the same result without wasted work).

Layout: the block works on (B, H, W, C) maps. In memory this is the same as (B, H*W, C) tokens,
so it costs nothing over tokens + hw, but the spatial shape travels with the tensor, and a
horizontal stripe is a plain view of it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.models.layers.drop import DropPath
from keel.models.layers.mlp import Mlp
from keel.models.layers.position import LePE


def _stripe_attention(qkv: torch.Tensor, window: tuple[int, int], num_heads: int, lepe: LePE | None,
                      dropout_p: float) -> torch.Tensor:
    """One branch. qkv: (B, H, W, 3, c) -> (B, H, W, c), attention within ``window`` tiles."""
    B, H, W, _, c = qkv.shape
    wh, ww = window
    ph, pw = (-H) % wh, (-W) % ww
    if ph or pw:
        qkv = F.pad(qkv, (0, 0, 0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    nh, nw = Hp // wh, Wp // ww
    n = wh * ww
    # (B*nW, N, 3, heads, d); one copy (a channel slice of qkv is not contiguous anyway)
    t = qkv.view(B, nh, wh, nw, ww, 3, num_heads, c // num_heads).transpose(2, 3)
    t = t.reshape(B * nh * nw, n, 3, num_heads, c // num_heads)
    q, k, v = t.unbind(2)
    mask = None
    if ph or pw:
        valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=qkv.device)
        valid[:H, :W] = True
        valid = valid.view(nh, wh, nw, ww).transpose(1, 2).reshape(nh * nw, n)
        mask = valid.expand(B, -1, -1).reshape(B * nh * nw, 1, 1, n)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, dropout_p=dropout_p)
    o = o.transpose(1, 2).reshape(B * nh * nw, n, c)
    if lepe is not None:
        o = o + lepe(v.reshape(B * nh * nw, n, c), window)
    o = o.view(B, nh, nw, wh, ww, c).transpose(2, 3).reshape(B, Hp, Wp, c)
    return o[:, :H, :W] if (ph or pw) else o


class CrossShapedAttention(nn.Module):
    """Cross-shaped window attention on a (B, H, W, C) map, or on (B, H*W, C) tokens with ``hw``.

    ``last_stage=True``: one branch, all heads, global attention (CSWin's last stage)."""

    def __init__(self, dim: int, num_heads: int, split_size: int, qkv_bias: bool = True, lepe: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, last_stage: bool = False):
        super().__init__()
        self.branches = 1 if last_stage else 2
        if dim % num_heads or num_heads % self.branches or dim % self.branches:
            raise ValueError(f"dim {dim} and num_heads {num_heads} must split evenly into "
                             f"{self.branches} branch(es)")
        self.dim, self.num_heads, self.split_size = dim, num_heads, split_size
        self.last_stage = last_stage
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # one conv per branch, as the official code's per-branch get_v
        self.lepe = nn.ModuleList(LePE(dim // self.branches) for _ in range(self.branches)) if lepe else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def windows(self, H: int, W: int) -> list[tuple[int, int]]:
        """The attention window (height, width) of each branch on an H x W map."""
        if self.last_stage:
            return [(H, W)]
        s = self.split_size
        return [(H, min(s, W)), (min(s, H), W)]  # vertical stripes, horizontal stripes

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        tokens = x.ndim == 3
        if tokens:
            if hw is None:
                raise ValueError("(B, N, C) tokens need hw=(H, W)")
            x = x.reshape(x.shape[0], hw[0], hw[1], x.shape[-1])
        B, H, W, C = x.shape
        heads, c = self.num_heads // self.branches, C // self.branches
        # unbind, not slicing: its backward is one stack instead of a zero-filled map per branch
        parts = self.qkv(x).view(B, H, W, 3, self.branches, c).unbind(4)
        p = self.attn_drop if self.training else 0.0
        outs = [_stripe_attention(part, win, heads, self.lepe[i] if self.lepe is not None else None, p)
                for i, (part, win) in enumerate(zip(parts, self.windows(H, W)))]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        out = self.proj_drop(self.proj(out))
        return out.reshape(B, H * W, C) if tokens else out


class CSWinBlock(nn.Module):
    """Pre-norm residual block: cross-shaped attention then MLP, on (B, H, W, C) maps.
    ``layer_scale``: initial value of per-channel residual scales (None: no scaling)."""

    def __init__(self, dim: int, num_heads: int, split_size: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 last_stage: bool = False, layer_scale: float | None = None, qkv_bias: bool = True,
                 attn_drop: float = 0.0, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossShapedAttention(dim, num_heads, split_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                         proj_drop=drop, last_stage=last_stage)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)
        if layer_scale is not None:
            self.ls1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.ls2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.ls1 = self.ls2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        x = x + self.drop_path(a if self.ls1 is None else a * self.ls1)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.ls2 is None else m * self.ls2)
