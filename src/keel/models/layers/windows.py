"""Tensor plumbing for windowed attention: pad, cut into windows, put back, and the mask that
keeps shifted windows from attending across the image's wrap-around seams."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, window: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """(B, H, W, C) -> zero-padded at the bottom/right to multiples of the window; returns the
    padded tensor and the padding added (ph, pw)."""
    H, W = x.shape[1:3]
    ph, pw = (-H) % window[0], (-W) % window[1]
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x, ph, pw


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of the window -> (B * nW, wh * ww, C)."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, wh * ww, C) -> (B, H, W, C)."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def shifted_window_mask(H: int, W: int, window: tuple[int, int], shift: tuple[int, int],
                        device=None) -> torch.Tensor:
    """(nW, N, N) additive mask for a map of H x W (multiples of the window) rolled by -shift:
    0 between tokens that came from the same region of the unrolled image, -100 otherwise
    (large enough to vanish in softmax, small enough to stay finite in bf16)."""
    n = window[0] * window[1]
    if not any(shift):
        return torch.zeros((H // window[0]) * (W // window[1]), n, n, device=device)
    region = torch.zeros(1, H, W, 1, device=device)
    cnt = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            region[:, hs, ws, :] = cnt
            cnt += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, N)
    mask = ids[:, None, :] - ids[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
