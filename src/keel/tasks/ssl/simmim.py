"""SimMIM (Xie et al. 2021): mask random square cells of the input, let the backbone run on the
whole image with the masked stem tokens replaced by a learned token, and regress the raw pixels
of the masked cells with a one-layer head.

- Mask: per image, ceil(``method.mask_ratio`` (0.6) x cells) of the ``mask_patch_size`` px cells,
  drawn in ``make_views`` from the step's generator (SimMIM's count), upsampled to the stem's
  token grid (stride 4 for keel_* and swin_*, the patch grid for a ViT). The masked tokens are
  replaced after the stem (Swin: after the patch embedding's norm; ViT: before the position
  embedding) by the method's ``mask_token``: ``backbone.forward_masked(x, mask, mask_token)``.
- ``mask_patch_size``: the paper's 32 px (the hierarchical backbones' total stride), lowered for
  small images to img_size / 4 (8 at 32 px, so an image has at least 4 x 4 cells) and rounded
  down to a multiple of the stem stride. A value set in the config is used as given (it must be
  a multiple of the stem stride and divide the image).
- Head: a 1x1 conv from the last map's channels to stride^2 x 3, then PixelShuffle(stride), back
  to the image's size (stride 32 for keel_* / swin_*, the patch size for a ViT).
- Loss: L1 on the masked pixels only, summed over the 3 channels and divided by 3 x the masked
  pixel count (SimMIM's). Target pixels: the view, in [0, 1] normalized with mean = std = 0.5
  (SimMIM uses ImageNet's statistics).
- Views: one random resized crop (scale (aug.scale_min, 1)) and flip; no colour jitter,
  grayscale or blur (SimMIM's crop scale is (0.67, 1): set aug.scale_min=0.67 to follow it).

Backbones: keel_tiny / small / base, swin_*, and ViTs. The trainer owns the optimizer; the paper
pretrains Swin with AdamW, betas (0.9, 0.999), weight decay 0.05 and lr 8e-4 at batch 2048
(``train.lr=1e-4`` here, which scales per 256 images), 10 warm-up epochs.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn

from keel.config import RunConfig
from keel.data.views import BatchAugment
from keel.tasks.ssl.augment import view_config
from keel.tasks.ssl.base import Method, register_method
from keel.models.hybrid import HybridNet
from keel.models.layers.init import trunc_normal_
from keel.models.swin import SwinTransformer
from keel.models.vit import VisionTransformer


def stem_geometry(backbone: nn.Module) -> tuple[int, int, int]:
    """(stem stride, stem channels, last map's stride) of a backbone SimMIM can mask."""
    if isinstance(backbone, VisionTransformer):
        p = backbone.cfg.patch_size
        return p, backbone.cfg.dim, p
    if isinstance(backbone, SwinTransformer):
        return backbone.cfg.patch_size, backbone.cfg.embed_dim, backbone.feature_info[-1]["stride"]
    if isinstance(backbone, HybridNet):
        return 4, backbone.cfg.widths[0], backbone.feature_info[-1]["stride"]
    raise ValueError(f"SimMIM masks the tokens of a stem: it needs a keel_*, swin_* or ViT backbone, "
                     f"not {type(backbone).__name__}")


def default_mask_patch_size(img_size: int, stem_stride: int) -> int:
    """32 px as the paper, at most img_size / 4, a multiple of the stem stride (at least one)."""
    size = min(32, img_size // 4)
    return max(stem_stride, size // stem_stride * stem_stride)


def random_cell_mask(batch: int, hw: tuple[int, int], ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, h, w) bool, True = masked: ceil(ratio * h * w) cells per image, uniformly at random."""
    cells = hw[0] * hw[1]
    count = math.ceil(cells * ratio)
    device = generator.device if generator is not None else "cpu"
    order = torch.rand(batch, cells, generator=generator, device=device).argsort(dim=1)
    mask = torch.zeros(batch, cells, dtype=torch.bool, device=device).scatter_(1, order[:, :count], True)
    return mask.view(batch, *hw)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, h, w) -> (B, h*factor, w*factor): each cell covers a factor x factor block."""
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 over the masked pixels: pred, target (B, C, H, W), mask (B, H, W) bool; the sum over
    masked pixels and channels divided by C x the masked pixel count. Every image masks the
    same number of cells, so the mean over processes is the loss of the whole batch."""
    m = mask.unsqueeze(1).to(torch.float32)
    err = (pred.float() - target.float()).abs()
    return (err * m).sum() / (m.sum() * pred.shape[1])


@register_method
class SimMIM(Method):
    name = "simmim"
    defaults = dict(mask_ratio=0.6)

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__(backbone, cfg)
        self.stem_stride, stem_channels, self.stride = stem_geometry(backbone)
        m = cfg.method
        self.mask_ratio = float(self.opt("mask_ratio"))
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"method.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        self.mask_patch_size = self.opt("mask_patch_size", default_mask_patch_size(cfg.data.img_size, self.stem_stride))
        if self.mask_patch_size % self.stem_stride:
            raise ValueError(f"method.mask_patch_size {self.mask_patch_size} is not a multiple of the backbone's "
                             f"stem stride {self.stem_stride}")
        self.mask_token = nn.Parameter(torch.zeros(stem_channels))
        trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Sequential(nn.Conv2d(backbone.num_features, self.stride ** 2 * 3, 1),
                                  nn.PixelShuffle(self.stride))
        self.augment = BatchAugment(replace(view_config(cfg), jitter_p=0.0, gray_p=0.0, blur_p=0.0))

    def make_views(self, images, generator, sizes=None):
        x = self.augment(images, generator, sizes)
        H, W = x.shape[-2:]
        s = self.mask_patch_size
        if H % s or W % s:
            raise ValueError(f"SimMIM: images {H}x{W} are not a multiple of method.mask_patch_size {s}")
        return x, random_cell_mask(len(x), (H // s, W // s), self.mask_ratio, generator).to(x.device)

    def training_step(self, views) -> dict:
        x, mask = views
        tokens = upsample_mask(mask, self.mask_patch_size // self.stem_stride)
        pred = self.head(self.backbone.forward_masked(x, tokens, self.mask_token))
        if pred.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"SimMIM: images {tuple(x.shape[-2:])} are not a multiple of the backbone's "
                             f"stride {self.stride}")
        return {"loss": masked_l1(pred, x, upsample_mask(mask, self.mask_patch_size))}
