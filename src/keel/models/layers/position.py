"""Position encodings: absolute (interpolated to any grid), Swin's relative position bias, and
CSWin's locally-enhanced position encoding (LePE)."""
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
