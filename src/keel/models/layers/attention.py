"""Global multi-head self-attention through ``F.scaled_dot_product_attention`` (fused kernels), and
its variant with MViTv2/ViTDet's decomposed relative positions (Li et al. 2022) added to the
logits through ``attn_mask`` (see :mod:`keel.models.layers.position` for the term)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.models.layers.position import decomposed_rel_pos


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v, each (B, heads, N, C / heads)."""
        B, N, C = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over the heads, merged and projected: (B, N, C)."""
        B, _, N, _ = q.shape
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(*self.heads(x), attn_mask)

    def attention_weights(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The softmax attention matrix (B, heads, N, N) that ``forward`` applies, for pictures
        (DINO's class-token maps); computed explicitly, not through the fused kernel."""
        q, k, _ = self.heads(x)
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            logits = logits + attn_mask
        return logits.softmax(-1)


class DecomposedRelPosAttention(Attention):
    """:class:`Attention` plus decomposed relative positions learnt on a ``grid`` (gh, gw):
    ``rel_pos_h`` (2*gh-1, head_dim) and ``rel_pos_w`` (2*gw-1, head_dim), zero at init so that
    the module starts as plain attention with the same weights (ViTDet's zero init). ``forward``
    and ``attention_weights`` take the grid ``hw`` of the last h*w tokens; the ``num_prefix``
    tokens before them (class token) are outside the grid and get no term, as query or as key."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, grid: tuple[int, int]):
        super().__init__(dim, num_heads, qkv_bias)
        self.grid = tuple(grid)
        head_dim = dim // num_heads
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * self.grid[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * self.grid[1] - 1, head_dim))

    def rel_pos_mask(self, q: torch.Tensor, hw: tuple[int, int] | None, num_prefix: int = 0,
                     attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decomposed term for queries q (B, heads, P + h*w, head_dim), zero on the prefix
        rows and columns, plus ``attn_mask``: (B, heads, P + h*w, P + h*w) in q's dtype."""
        if hw is None:
            raise ValueError("attention with decomposed relative positions needs the patch grid hw")
        p = num_prefix
        term = decomposed_rel_pos(q[:, :, p:], self.rel_pos_h, self.rel_pos_w, hw)
        if p:
            term = F.pad(term, (p, 0, p, 0))
        if attn_mask is not None:
            term = term + attn_mask
        return term.to(q.dtype)   # SDPA wants a float mask in the queries' dtype (autocast)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                hw: tuple[int, int] | None = None, num_prefix: int = 0) -> torch.Tensor:
        q, k, v = self.heads(x)
        return self.attend(q, k, v, self.rel_pos_mask(q, hw, num_prefix, attn_mask))

    def attention_weights(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                          hw: tuple[int, int] | None = None, num_prefix: int = 0) -> torch.Tensor:
        q = self.heads(x)[0]
        return super().attention_weights(x, self.rel_pos_mask(q, hw, num_prefix, attn_mask))
