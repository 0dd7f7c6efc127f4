"""Position encodings: absolute (interpolated to any grid), Swin's relative position bias,
MViTv2/ViTDet's decomposed relative positions, and CSWin's locally-enhanced position encoding (LePE).

Decomposed relative positions (MViTv2, Li et al. 2022; used by ViTDet): along each axis a table
of 2g-1 vectors (one per offset -(g-1) .. g-1, head_dim wide, shared by the heads) adds
``q . R_h[h_q - h_k] + q . R_w[w_q - w_k]`` to the logit of query q and key k, q unscaled (the
1/sqrt(head_dim) scale applies to q . k only, as in ViTDet). A table learnt for one size is
resampled to 2g'-1 rows for a grid of g' linearly (``F.interpolate`` 'linear', half-pixel centres,
no antialiasing), as detectron2's ``get_rel_pos`` does."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.models.layers.init import trunc_normal_


def interpolate_pos_embed(pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """(1, gh*gw, D) position table laid out on ``src_grid`` -> the same table on ``dst_grid``
    (bicubic), so a model built at one resolution runs at any other."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    gh, gw = src_grid
    pe = pos_embed.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    pe = F.interpolate(pe.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return pe.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], -1)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """(N, N) index into a ((2*wh-1) * (2*ww-1))-entry table, N = wh*ww: the table entry for the
    offset between every pair of positions in a window."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), offsets in [-(w-1), w-1]
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def resize_rel_pos(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A (L, C) table of offsets along one axis -> (rows, C), resampled linearly."""
    if table.shape[0] == rows:
        return table
    t = F.interpolate(table.T[None].float(), size=rows, mode="linear", align_corners=False)
    return t[0].T.to(table.dtype)


def rel_pos_for(table: torch.Tensor, size: int) -> torch.Tensor:
    """A (L, C) table of offsets along one axis -> (size, size, C): entry [i, j] is the row for
    offset i - j. A table of L != 2*size-1 rows is first resampled linearly to that length."""
    table = resize_rel_pos(table, 2 * size - 1)
    pos = torch.arange(size, device=table.device)
    return table[pos[:, None] - pos[None, :] + size - 1]


def decomposed_rel_pos(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                       hw: tuple[int, int]) -> torch.Tensor:
    """Queries (B, heads, h*w, C) of an h x w grid (row by row) -> the (B, heads, h*w, h*w) logit
    term ``q . R_h[h_q - h_k] + q . R_w[w_q - w_k]`` for every key of the same grid."""
    h, w = hw
    B, H, N, C = q.shape
    if N != h * w:
        raise ValueError(f"decomposed_rel_pos: {N} queries do not form the {h}x{w} grid")
    grid_q = q.reshape(B, H, h, w, C)
    by_row = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_pos_for(rel_pos_h, h))  # over key rows
    by_col = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_pos_for(rel_pos_w, w))  # over key columns
    # the (key row, key column) pair of a key takes one term of each
    return (by_row[..., :, None] + by_col[..., None, :]).reshape(B, H, N, N)


class RelativePositionBias(nn.Module):
    """Swin's learned bias per head for each relative offset inside a window; added to the
    attention logits. ``forward()`` -> (num_heads, N, N)."""

    def __init__(self, window: tuple[int, int], num_heads: int):
        super().__init__()
        self.window = tuple(window)
        self.num_heads = num_heads
        wh, ww = self.window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1).contiguous()


class LePE(nn.Module):
    """Locally-enhanced position encoding (CSWin): a depth-wise conv over V, laid out as an
    image, added to the attention output. Takes and returns (B, H*W, C) tokens."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, C = v.shape
        x = v.transpose(1, 2).reshape(B, C, hw[0], hw[1])
        return self.conv(x).flatten(2).transpose(1, 2)
