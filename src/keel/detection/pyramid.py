"""Feature pyramids that turn a keel backbone into a torchvision detector's backbone.

* :func:`vitdet_vit` makes ViTDet's backbone (Li et al. 2022, "Exploring Plain Vision Transformer
  Backbones for Object Detection") from a pretrained keel ViT: windowed attention (14 x 14 windows)
  in all blocks but 4 evenly spaced global ones (2, 5, 8, 11 of 12), no class token, drop-path 0.1
  (ViT-B's; ViTDet uses 0.4 for L, 0.5 for H). The weights load unchanged: the class/distillation
  tokens and their position entries are dropped (ViTDet drops the class token's position too), the
  patch part of ``pos_embed`` stays at the pretraining grid and is resampled to each input's grid
  by the model's ``pos_embed_for``, as ViTDet resamples its 224-px table at every forward.
  ``rel_pos_decomposed=True`` adds ViTDet's decomposed relative positions (its ``use_rel_pos``,
  on in all of ViTDet's configs; off here by default): zero tables per block (window-sized in
  windowed blocks), so the converted model starts equal to the one without them.
* :class:`SimpleFeaturePyramid` is ViTDet's simple pyramid over the last (stride-s) map only:
  scale 4 = two 2x2 stride-2 transposed convs with a channel LayerNorm + GELU between, scale 2 =
  one, scale 1 = the map, scale 1/2 = 2x2 max-pool; each then a 1x1 conv and a 3x3 conv (no bias)
  each followed by a channel LayerNorm, to ``out_channels``; p6 subsamples p5 by a kernel-1
  stride-2 max-pool (Detectron2's LastLevelMaxPool, torchvision's too).
* :class:`HierarchicalFPN` is torchvision's ``FeaturePyramidNetwork`` + ``LastLevelMaxPool`` over the
  last (at most 4) maps of stride >= 4 of a multi-stage backbone (hybrid, Swin, CSWin, ResNets).

Both return what torchvision's detectors take: an OrderedDict ``{"0": p2, ..., "pool": p6}`` of
``out_channels`` maps, with ``strides`` (one per entry), ``featmap_names`` (the entries RoIs pool
from: all but "pool") and ``size_divisible``.

Input sizes. Inputs must be multiples of ``size_divisible`` (the lcm of the strides, p6's
included: 64 for a /16 ViT) and the pyramids raise otherwise; build the detector with
``size_divisible=pyramid.size_divisible`` so that torchvision's ``GeneralizedRCNNTransform`` pads
each batch (bottom/right, zeros) to it. Padding inside instead would be wrong with torchvision:
its ``AnchorGenerator`` takes each level's stride as ``batch_size // map_size``, so maps made
from a larger (padded) image, or rounded up from a size that is not a multiple (800 px -> p6 of
13 -> "stride" 61), shift every anchor. Multiples of patch x window are not needed: the ViT pads
its token grid to whole windows itself (as ViTDet does) and masks that padding out of attention.

keel's ViT ends in its final LayerNorm (``feature_maps``); ViTDet's backbone has none. The
pyramid's own LayerNorms follow it, so this only rescales what the first convs see.

:func:`layer_id` numbers a ViT detector's parameters for layer-wise lr decay with the convention
of :mod:`keel.engine.optim` (and ViTDet's): 0 = patch embedding and positions, i + 1 = block i,
L + 1 = everything after the blocks (final norm, pyramid, heads). The pyramids keep the network
as ``backbone``, so ``keel.engine.optim.layer_ids(pyramid)`` numbers them as well.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
import torch.nn as nn
from torchvision.models.convnext import LayerNorm2d as _TVLayerNorm2d
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from keel.models.layers.position import interpolate_pos_embed, resize_rel_pos
from keel.models.vit import VisionTransformer

SCALES = (4.0, 2.0, 1.0, 0.5)          # ViTDet's four pyramid levels, relative to the ViT's map
# parts of a pretraining checkpoint a windowed backbone has no place for: prefix tokens (their
# positions are cut from pos_embed), MAE's mask token and decoder, classification heads
_DROPPED = re.compile(r"(cls_token|dist_token|mask_token|decoder_.*|head(_dist)?\..*)")
_DECOMPOSED = re.compile(r"blocks\.\d+\.attn\.rel_pos_[hw]")   # decomposed relative position tables


class LayerNorm2d(_TVLayerNorm2d):
    """LayerNorm over the channels of a (B, C, H, W) map (torchvision's ConvNeXt one) with
    ViTDet's eps of 1e-6."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)


# ---------------------------------------------------------------- ViTDet backbone
def default_global_blocks(depth: int) -> tuple[int, ...]:
    """4 evenly spaced global-attention blocks, the last one last: (2, 5, 8, 11) for depth 12."""
    return tuple(sorted({(i + 1) * depth // 4 - 1 for i in range(4)} - {-1}))


def vitdet_vit(vit: VisionTransformer, window_size: int = 14, global_blocks: Sequence[int] | None = None,
               drop_path_rate: float = 0.1, img_size: int | None = None,
               rel_pos_decomposed: bool = False) -> VisionTransformer:
    """A head-less windowed copy of ``vit`` with its weights (see the module docstring).
    ``img_size`` (default: ``vit``'s) is the grid its position table is stored at; a different
    one resamples the table once here (bicubic) instead of at every forward.
    ``rel_pos_decomposed``: add zero-initialised decomposed relative positions; a ``vit`` that
    has them keeps them (resampled to the window where it differs) whatever this says."""
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"vitdet_vit needs a keel VisionTransformer, got {type(vit).__name__}")
    if window_size <= 0:
        raise ValueError(f"vitdet_vit: window_size must be > 0, got {window_size}")
    blocks = default_global_blocks(vit.cfg.depth) if global_blocks is None else tuple(global_blocks)
    cfg = replace(vit.cfg, class_token=False, distilled=False, global_pool="avg", window_size=window_size,
                  global_blocks=blocks, drop_path_rate=drop_path_rate,
                  img_size=vit.cfg.img_size if img_size is None else img_size,
                  rel_pos_decomposed=rel_pos_decomposed or vit.cfg.rel_pos_decomposed)
    model = VisionTransformer(cfg, num_classes=0)
    load_vitdet_weights(model, vit.state_dict())
    return model.to(vit.pos_embed.device)


def load_vitdet_weights(model: VisionTransformer, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a ViT pretraining state dict (keel/timm names: a keel ViT's, DeiT's, MAE's with its
    decoder) into the windowed ``model``: prefix tokens, their positions, MAE's mask token and
    decoder and any head are dropped; position and relative-position tables of another grid are
    resampled (bicubic; decomposed tables linearly, as ViTDet); decomposed relative position tables
    the source does not have are set to zero; everything else must match ``model`` exactly."""
    own = model.state_dict()
    sd = {k: v for k, v in state_dict.items() if not _DROPPED.fullmatch(k)}
    if "pos_embed" in sd:
        prefix = int("cls_token" in state_dict) + int("dist_token" in state_dict)
        sd["pos_embed"] = _patch_positions(sd["pos_embed"][:, prefix:], model.grid)
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
            sd[k] = _resample_rel_table(v, own[k].shape[0])
        elif _DECOMPOSED.fullmatch(k) and k in own and v.shape != own[k].shape:
            sd[k] = resize_rel_pos(v, own[k].shape[0])
    for k in own:
        if _DECOMPOSED.fullmatch(k) and k not in sd:
            sd[k] = torch.zeros_like(own[k])   # zero terms: the model computes what the source did
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"load_vitdet_weights: state dict does not fit the ViT: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    model.load_state_dict(sd)


def _patch_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, g*g, D) patch positions -> the same on a grid x grid layout."""
    g = math.isqrt(pos.shape[1])
    if g * g != pos.shape[1]:
        raise ValueError(f"load_vitdet_weights: pos_embed has {pos.shape[1]} patch entries, not a square grid")
    return interpolate_pos_embed(pos, (g, g), (grid, grid))


def _resample_rel_table(table: torch.Tensor, entries: int) -> torch.Tensor:
    """A ((2g-1)^2, heads) table of relative offsets -> ``entries`` = (2w-1)^2 rows: the offsets
    form an image, resampled like a position table (as keel's ViT does for other grids)."""
    src, dst = math.isqrt(table.shape[0]), math.isqrt(entries)
    return interpolate_pos_embed(table[None], (src, src), (dst, dst))[0]


# ---------------------------------------------------------------- pyramids
def _check_size(x: torch.Tensor, size_divisible: int, who: str) -> None:
    H, W = x.shape[-2:]
    if H % size_divisible or W % size_divisible:
        raise ValueError(f"{who}: input {H}x{W} is not a multiple of size_divisible={size_divisible} "
                         f"(give the detector size_divisible=pyramid.size_divisible)")


def _lcm(values: Sequence[int]) -> int:
    return math.lcm(*(int(v) for v in values))


def _check_backbone(backbone: nn.Module, who: str) -> None:
    if not (hasattr(backbone, "feature_maps") and getattr(backbone, "feature_info", None)):
        raise ValueError(f"{who}: {type(backbone).__name__} is not a keel backbone "
                         f"(it needs feature_maps(x) and feature_info)")


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over ``backbone.feature_maps(x)[-1]`` (stride s, D channels):
    one level per ``scale_factors`` entry (of 4, 2, 1, 0.5) at stride s / scale, then p6 at twice
    the last level's stride. (B, 3, H, W), H and W multiples of ``size_divisible`` ->
    OrderedDict "0", "1", ..., "pool" of (B, out_channels, H / stride, W / stride)."""

    def __init__(self, backbone: nn.Module, out_channels: int = 256, scale_factors: Sequence[float] = SCALES):
        super().__init__()
        _check_backbone(backbone, "SimpleFeaturePyramid")
        bad = [f for f in scale_factors if f not in SCALES]
        if bad or not scale_factors:
            raise ValueError(f"SimpleFeaturePyramid: scale_factors must be taken from {SCALES}, got {tuple(scale_factors)}")
        stride, dim = backbone.feature_info[-1]["stride"], backbone.feature_info[-1]["channels"]
        if any(stride % f for f in scale_factors if f > 1):
            raise ValueError(f"SimpleFeaturePyramid: stride {stride} cannot be up-sampled by {tuple(scale_factors)}")
        self.backbone = backbone
        self.levels = nn.ModuleList(_level(dim, f, out_channels) for f in scale_factors)
        self.top = LastLevelMaxPool()
        self.out_channels = out_channels
        self.strides = [int(stride / f) for f in scale_factors]
        self.strides.append(2 * self.strides[-1])
        self.featmap_names = [str(i) for i in range(len(scale_factors))]
        self.size_divisible = _lcm([stride, *self.strides])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        _check_size(x, self.size_divisible, "SimpleFeaturePyramid")
        feat = self.backbone.feature_maps(x)[-1]
        maps = [level(feat) for level in self.levels]
        maps, names = self.top(maps, [], list(self.featmap_names))  # it appends "pool" in place
        return OrderedDict(zip(names, maps))


def _resample(dim: int, scale: float) -> tuple[nn.Module, int]:
    """The up/down-sampling of one ViTDet level and its output channels."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, 2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    return nn.MaxPool2d(2, 2), dim


def _level(dim: int, scale: float, out_channels: int) -> nn.Sequential:
    resample, channels = _resample(dim, scale)
    return nn.Sequential(
        resample,
        Conv2dNormActivation(channels, out_channels, 1, norm_layer=LayerNorm2d, activation_layer=None, bias=False),
        Conv2dNormActivation(out_channels, out_channels, 3, norm_layer=LayerNorm2d, activation_layer=None, bias=False))


class HierarchicalFPN(nn.Module):
    """torchvision's FPN (lateral 1x1 + top-down nearest up-sampling + 3x3 output convs) with
    LastLevelMaxPool over the last ``max_levels`` maps of ``backbone.feature_maps(x)`` whose stride
    is at least ``min_stride``. (B, 3, H, W), H and W multiples of ``size_divisible`` ->
    OrderedDict "0", "1", ..., "pool" of (B, out_channels, H / stride, W / stride)."""

    def __init__(self, backbone: nn.Module, out_channels: int = 256, min_stride: int = 4, max_levels: int = 4):
        super().__init__()
        _check_backbone(backbone, "HierarchicalFPN")
        info = backbone.feature_info
        picked = [i for i, f in enumerate(info) if f["stride"] >= min_stride][-max_levels:]
        if not picked:
            raise ValueError(f"HierarchicalFPN: {type(backbone).__name__} has no feature map of stride >= {min_stride}")
        self.backbone = backbone
        self.indices = picked
        self.fpn = FeaturePyramidNetwork([info[i]["channels"] for i in picked], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.strides = [int(info[i]["stride"]) for i in picked]
        self.strides.append(2 * self.strides[-1])
        self.featmap_names = [str(i) for i in range(len(picked))]
        self.size_divisible = _lcm([f["stride"] for f in info] + self.strides)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        _check_size(x, self.size_divisible, "HierarchicalFPN")
        maps = self.backbone.feature_maps(x)
        return self.fpn(OrderedDict((name, maps[i]) for name, i in zip(self.featmap_names, self.indices)))


def build_pyramid(backbone: nn.Module, out_channels: int = 256, window_size: int = 14,
                  global_blocks: Sequence[int] | None = None, drop_path_rate: float = 0.1,
                  to_vitdet: bool = True, scale_factors: Sequence[float] = SCALES,
                  rel_pos_decomposed: bool = False) -> nn.Module:
    """The pyramid for ``backbone``: a keel ViT (or any backbone with a single map) gets the simple
    pyramid, the ViT first made ViTDet's windowed one by :func:`vitdet_vit` (with
    ``rel_pos_decomposed``) when ``to_vitdet`` and it is not windowed already; a multi-stage
    backbone gets :class:`HierarchicalFPN`."""
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"build_pyramid: backbone must be a keel model (nn.Module), got {type(backbone).__name__}")
    _check_backbone(backbone, "build_pyramid")
    if isinstance(backbone, VisionTransformer):
        if to_vitdet and not backbone.cfg.window_size:
            backbone = vitdet_vit(backbone, window_size, global_blocks, drop_path_rate,
                                  rel_pos_decomposed=rel_pos_decomposed)
        return SimpleFeaturePyramid(backbone, out_channels, scale_factors)
    if len(backbone.feature_info) == 1:
        return SimpleFeaturePyramid(backbone, out_channels, scale_factors)
    return HierarchicalFPN(backbone, out_channels)


# ---------------------------------------------------------------- layer-wise lr decay
# Wrappers between the detector and the ViT: torchvision's detector keeps the pyramid as
# ``backbone``, the pyramid keeps the ViT as ``backbone``; DDP adds "module.", compile "_orig_mod.".
_WRAPPERS = re.compile(r"^(?:(?:backbone|module|_orig_mod)\.)*")
_VIT_BLOCK = re.compile(r"blocks\.(\d+)(?:\.|$)")
_VIT_FIRST = ("patch_embed", "pos_embed", "cls_token", "dist_token", "mask_token")
_STAGED = ("stages", "stem", "downsamples")


def layer_id(name: str, num_layers: int) -> int:
    """Layer id of parameter ``name`` of a ViT detector (or its pyramid, or the ViT) with
    ``num_layers`` blocks: 0 = patch embedding and positions, i + 1 = block i, ``num_layers`` + 1 =
    the rest (final norm, pyramid, RPN, RoI heads). The lr scale is then
    ``decay ** (num_layers + 1 - layer_id)`` (ViTDet: 0.7 for ViT-B)."""
    rest = name[_WRAPPERS.match(name).end():]
    top = rest.split(".", 1)[0]
    if top in _STAGED:
        raise ValueError(f"layer_id numbers plain-ViT detectors; '{name}' is a multi-stage backbone's: "
                         f"use keel.engine.optim.layer_ids(pyramid)")
    m = _VIT_BLOCK.match(rest)
    if m:
        return int(m.group(1)) + 1
    return 0 if top in _VIT_FIRST else num_layers + 1
