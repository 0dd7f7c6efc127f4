"""Swin's building blocks: multi-head attention inside windows, the (shifted-)window
Transformer block on (B, H, W, C) maps, and 2x2 patch merging."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.models.layers.drop import DropPath
from keel.models.layers.mlp import Mlp
from keel.models.layers.position import LePE, RelativePositionBias
from keel.models.layers.windows import pad_to_multiple, shifted_window_mask, window_partition, window_reverse


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def sub_window_index(window: tuple[int, int], table_window: tuple[int, int]) -> torch.Tensor:
    """(N, N) index into the bias table of ``table_window`` for a window no larger than it: the
    offsets inside a smaller window are a subset of the big window's, so the bias of an offset
    stays the same parameter whatever the window used at run time."""
    wh, ww = window
    th, tw = table_window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + th - 1) * (2 * tw - 1) + (rel[1] + tw - 1)


class WindowAttention(nn.Module):
    """Multi-head self-attention within each window; tokens come as (B * nW, N, C), N = wh * ww.

    ``forward(x, mask, window)``: ``mask`` is an additive (nW, N, N) mask (Swin's shift mask),
    ``window`` the window actually used when the block shrank it to a small map (at most the
    built one; the relative-position table of the built window serves it).

    Bias and mask go to ``F.scaled_dot_product_attention`` as one float mask, except while
    training on the CPU with the bias learnt: there the same softmax is written out (see forward).
    """

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], qkv_bias: bool = True,
                 rel_pos: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, lepe: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = _pair(window)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rel_pos = RelativePositionBias(self.window, num_heads) if rel_pos else None
        # LePE (CSWin): a depth-wise conv over V inside each window, added to the output
        self.lepe = LePE(dim) if lepe else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._index_cache: dict = {}  # (window, device) -> index; recomputed, never saved

    def position_bias(self, window: tuple[int, int] | None = None) -> torch.Tensor | None:
        """(num_heads, N, N) relative-position bias for ``window`` (default: the built one)."""
        if self.rel_pos is None:
            return None
        window = self.window if window is None else tuple(window)
        if window == self.window:
            return self.rel_pos()
        if window[0] > self.window[0] or window[1] > self.window[1]:
            raise ValueError(f"window {window} is larger than the attention's {self.window}")
        table = self.rel_pos.relative_position_bias_table
        key = (window, table.device)
        if key not in self._index_cache:
            self._index_cache[key] = sub_window_index(window, self.window).to(table.device).view(-1)
        n = window[0] * window[1]
        return table[self._index_cache[key]].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                window: tuple[int, int] | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.position_bias(window)
        attn_mask = None if bias is None else bias.unsqueeze(0)            # (1, heads, N, N)
        if mask is not None:
            m = mask.unsqueeze(1)                                           # (nW, 1, N, N)
            attn_mask = m if attn_mask is None else attn_mask + m
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)  # under autocast q is half precision, the table is not
        dropout = self.attn_drop if self.training else 0.0
        if attn_mask is not None and attn_mask.requires_grad and q.device.type == "cpu":
            # SDPA's fused CPU kernel gives no gradient for the mask, so SDPA would fall back to its
            # math path (which adds a NaN-safe softmax and scales q and k apart): the same formula
            # written out is ~10% faster and broadcasts the shift mask over images for free
            x = _softmax_attention(q, k, v, attn_mask, dropout)
        else:
            if attn_mask is not None and attn_mask.shape[0] > 1:
                # fused kernels (CPU flash, CUDA memory-efficient with bias gradient) take 4-D masks
                # only: repeat the per-window mask for each image of the batch
                nW = attn_mask.shape[0]
                attn_mask = attn_mask.expand(B_ // nW, -1, -1, -1, -1).reshape(B_, -1, N, N)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        x = x.transpose(1, 2).reshape(B_, N, C)
        if self.lepe is not None:
            x = x + self.lepe(v.transpose(1, 2).reshape(B_, N, C), window or self.window)
        return self.proj_drop(self.proj(x))


def _softmax_attention(q, k, v, attn_mask, dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with a (nW or 1, heads or 1, N, N) mask over (B * nW)
    windows numbered image by image."""
    B_, h, N, d = q.shape
    logits = (q * d ** -0.5) @ k.transpose(-1, -2)
    nW = attn_mask.shape[0]
    logits = (logits.view(B_ // nW, nW, h, N, N) + attn_mask).view(B_, h, N, N)
    attn = logits.softmax(-1)
    if dropout:
        attn = F.dropout(attn, dropout)
    return attn @ v


class SwinBlock(nn.Module):
    """Pre-norm Transformer block with (shifted-)window attention on (B, H, W, C) maps.

    The map is zero-padded to a multiple of the window (after the norm, as the official Swin
    does: padded tokens are zero vectors that take part in attention), rolled by -shift with the
    mask that keeps wrapped-around regions apart, attended window by window, and put back. On a
    map no larger than the window along an axis, the window shrinks to the map and there is no
    shift along that axis (the whole map is one window, as in Swin's last stage).

    ``conv_qkv``: a depth-wise 3x3 conv of the normalized map is added to it before windowing, so
    Q, K and V see their neighbourhood ("conv + attention"). ``lepe``: CSWin's locally-enhanced
    position encoding inside each window, instead of or beside ``rel_pos``. ``layer_scale``: a learnable
    per-channel scale on both residual branches, initialised to that value (CaiT).
    """

    def __init__(self, dim: int, num_heads: int, window, shift, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, rel_pos: bool = True, conv_qkv: bool = False,
                 layer_scale: float | None = None, qkv_bias: bool = True, lepe: bool = False):
        super().__init__()
        self.window, self.shift = _pair(window), _pair(shift)
        if not all(0 <= s < w for s, w in zip(self.shift, self.window)):
            raise ValueError(f"shift {self.shift} must lie in [0, window {self.window})")
        self.norm1 = nn.LayerNorm(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if conv_qkv else None
        self.attn = WindowAttention(dim, num_heads, self.window, qkv_bias=qkv_bias, rel_pos=rel_pos, lepe=lepe)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma1 = self.gamma2 = None
        self._mask_cache: dict = {}  # (H, W, window, shift, device) -> mask; a dict stays out of state_dict

    def window_and_shift(self, H: int, W: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The window and shift used on an H x W map."""
        window = (min(self.window[0], H), min(self.window[1], W))
        shift = tuple(0 if n <= w else s for n, w, s in zip((H, W), self.window, self.shift))
        return window, shift

    def _shift_mask(self, H: int, W: int, window, shift, device) -> torch.Tensor:
        key = (H, W, window, shift, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = shifted_window_mask(H, W, window, shift, device=device)
        return self._mask_cache[key]

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        window, shift = self.window_and_shift(H, W)
        if self.dwconv is not None:
            # (B, H, W, C) viewed as NCHW is channels-last memory: the conv needs no copy
            x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x, ph, pw = pad_to_multiple(x, window)
        Hp, Wp = H + ph, W + pw
        mask = None
        if any(shift):
            x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
            mask = self._shift_mask(Hp, Wp, window, shift, x.device)
        x = self.attn(window_partition(x, window), mask, window)
        x = window_reverse(x, window, Hp, Wp)
        if any(shift):
            x = torch.roll(x, shift, (1, 2))
        if ph or pw:
            x = x[:, :H, :W]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._attention(self.norm1(x))
        x = x + self.drop_path(a if self.gamma1 is None else a * self.gamma1)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(m if self.gamma2 is None else m * self.gamma2)

    def extra_repr(self) -> str:
        return f"window={self.window}, shift={self.shift}"


class PatchMerging(nn.Module):
    """Swin's down-sampling: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C) by concatenating each
    2x2 neighbourhood (odd sizes zero-padded), LayerNorm(4C), Linear(4C, 2C) without bias.

    The concatenation order is the official one — (row 0, col 0), (row 1, col 0), (row 0, col 1),
    (row 1, col 1) — so Swin checkpoints load without permuting the reduction's columns."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # (B, H/2, row, W/2, col, C) -> (B, H/2, W/2, col, row, C): col-major over the 2x2 block
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))
