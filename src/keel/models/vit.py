"""Vision Transformer (Dosovitskiy et al. 2021) and DeiT (Touvron et al. 2021): patch embedding,
class token (and DeiT's distillation token), pre-norm blocks.

Attention runs through ``F.scaled_dot_product_attention``. Options beyond the plain ViT:

* Position embedding: an absolute table laid out like timm's (and DeiT's, MAE's): one entry per
  prefix token (class, distillation) followed by one per patch of the ``img_size`` grid. Only the
  patch part is interpolated (bicubic, :func:`interpolate_pos_embed`) when the input grid differs,
  as DeiT and MAE resize checkpoints; timm's ``dynamic_img_size`` resamples with antialiasing
  (another cubic kernel), so off the built size their tables, and outputs, differ.
* ``rel_pos=True``: each block also adds a learned Swin-style relative position bias (a table per
  offset between two patches, one value per head) to its attention logits. The table covers the
  patch grid of ``img_size`` in global blocks (resampled bicubically for other grids) and the
  window in windowed blocks. Prefix tokens are outside the grid: their rows and columns get no
  bias. Tables start at zero, so a ``rel_pos`` model starts as the plain ViT with the same weights.
  A global block materialises a (heads, N, N) bias: fine at 224 px, heavy on ViTDet's 64 x 64
  grid.
* ``rel_pos_decomposed=True`` (ViTDet's ``use_rel_pos``, from MViTv2, Li et al. 2022): each
  block's attention also adds ``q . R_h[h_q - h_k] + q . R_w[w_q - w_k]`` (q unscaled) to its
  logits, with per-block tables ``attn.rel_pos_h`` and ``attn.rel_pos_w`` of (2g-1, head_dim) for
  a g x g grid, shared by the heads (detectron2's and timm's names and shapes; ViTDet-B: 27 rows
  in its 14 x 14 windows, 127 in its global blocks at 1024 px). As for ``rel_pos``, the tables
  cover the window in windowed blocks and the patch grid of ``img_size`` in global blocks, are
  resampled (linearly, per axis, as ViTDet's ``get_rel_pos``) for other grids, give prefix tokens
  no term and start at zero. The tables are small, but the term depends on q, so it reaches SDPA
  as a (B, heads, N, N) float mask. Independent of ``rel_pos`` (both may be on; their terms add).
* ``window_size > 0`` (ViTDet, Li et al. 2022): the blocks not listed in ``global_blocks`` attend
  within non-overlapping ``window_size`` x ``window_size`` cells of the patch grid; the grid is
  padded at the bottom/right to a multiple of the window, and the padded positions are masked out
  of the keys (ViTDet lets its zero padding be attended; masking keeps border windows from seeing
  tokens that are not in the image). As in ViTDet a windowed model has no class token: build it
  with ``class_token=False, global_pool="avg"`` (a class token could only be global, which would
  let every windowed block mix the whole image through it).

Self-supervised pretraining paths: ``forward_visible(x, keep)`` runs only the kept patches (MAE's
encoder, no mask tokens), ``forward_tokens(x, mask, mask_token)`` / ``forward_masked`` replace the
masked patch embeddings by a token (SimMIM's).

A registry name fixes the defaults (``vit_base_patch16``: ViT-B, 16 px patches, 224 px) and
keywords override any config field, the patch size too:
``create_model("vit_base_patch16", patch_size=14, img_size=518)`` is a ViT-B/14 at 518 px.

DeiT's distilled models (``deit_*_distilled_patch16``) add a distillation token after the class
token, with its own head ``head_dist``. Like DeiT's official code, ``forward`` returns
``(class logits, distillation logits)`` in train mode and their average in eval mode (the logits
are averaged, as in DeiT's and timm's code, not the softmax outputs the paper describes);
``embed`` is the mean of the two tokens' features, as timm's ``pre_logits``; head-less
(``num_classes=0``), ``forward`` is ``embed`` in both modes. To fine-tune a distilled model
without a teacher, average the two train-mode outputs (timm's default) or give both the labels.

Parameter names are timm's, so timm state dicts load after a key check
(:func:`from_timm_state_dict`); ``TIMM_NAMES`` lists each model's timm counterpart.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.models.layers import Attention, DropPath, Mlp
from keel.models.layers.attention import DecomposedRelPosAttention
from keel.models.layers.init import trunc_normal_
from keel.models.layers.position import RelativePositionBias, interpolate_pos_embed, relative_position_index
from keel.models.layers.windows import pad_to_multiple, window_partition, window_reverse
from keel.models.registry import register_model


POOLS = ("token", "avg")   # what embed() returns: the class token | the mean of the patch tokens


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
    class_token: bool = True
    distilled: bool = False         # DeiT: a distillation token after the class token, own head
    rel_pos: bool = False           # a relative position bias per block (zero at init)
    rel_pos_decomposed: bool = False  # ViTDet's decomposed relative positions (zero at init)
    window_size: int = 0            # > 0: ViTDet windowed attention outside global_blocks
    global_blocks: tuple[int, ...] = ()  # block indices that attend globally when windowed


def _bias_for_grid(rpb: RelativePositionBias, hw: tuple[int, int]) -> torch.Tensor:
    """(heads, N, N) bias for an h x w grid from a table learnt on ``rpb.window``: the table of
    offsets is itself a (2g-1) x (2g-1) image, resampled like an absolute position table."""
    if tuple(hw) == rpb.window:
        return rpb()
    (gh, gw), (h, w) = rpb.window, hw
    table = interpolate_pos_embed(rpb.relative_position_bias_table[None], (2 * gh - 1, 2 * gw - 1),
                                  (2 * h - 1, 2 * w - 1))[0]
    idx = relative_position_index((h, w)).to(table.device).view(-1)
    return table[idx].view(h * w, h * w, -1).permute(2, 0, 1)


class Block(nn.Module):
    """Pre-norm Transformer block. ``window > 0``: attention within window x window cells of the
    patch grid (the input must then be patch tokens only). ``rel_grid``: add a relative position
    bias learnt on that grid (or on the window) to the attention logits, none for the first
    ``num_prefix`` tokens; ``decomposed_grid``: the same with decomposed relative positions. All
    need the grid ``hw`` in ``forward``."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path, window: int = 0,
                 rel_grid: tuple[int, int] | None = None, num_prefix: int = 0,
                 decomposed_grid: tuple[int, int] | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.decomposed = decomposed_grid is not None
        if self.decomposed:
            grid = (window, window) if window else decomposed_grid
            self.attn = DecomposedRelPosAttention(dim, num_heads, qkv_bias, grid)
        else:
            self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.window = window
        self.num_prefix = num_prefix
        self.rel_pos = None
        if rel_grid is not None:
            self.rel_pos = RelativePositionBias((window, window) if window else rel_grid, num_heads)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            y = self._window_attn(y, hw)
        else:
            y = self._attend(y, self._global_bias(hw), hw, self.num_prefix)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _attend(self, x, mask, hw, num_prefix):
        if self.decomposed:
            return self.attn(x, mask, hw, num_prefix)
        return self.attn(x, mask)

    def attention_weights(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        """The softmax attention (B, heads, N, N) of a global block on its input x."""
        extra = (hw, self.num_prefix) if self.decomposed else ()
        return self.attn.attention_weights(self.norm1(x), self._global_bias(hw), *extra)

    def _global_bias(self, hw):
        if self.rel_pos is None:
            return None
        if hw is None:
            raise ValueError("a block with a relative position bias needs the patch grid hw")
        bias = _bias_for_grid(self.rel_pos, hw)
        p = self.num_prefix
        return F.pad(bias, (p, 0, p, 0)) if p else bias

    def _window_attn(self, x, hw):
        if hw is None:
            raise ValueError("a windowed block needs the patch grid hw")
        B, N, C = x.shape
        h, w = hw
        win = (self.window, self.window)
        x, ph, pw = pad_to_multiple(x.view(B, h, w, C), win)
        Hp, Wp = h + ph, w + pw
        mask = self.rel_pos() if self.rel_pos is not None else None  # (heads, n, n)
        if ph or pw:
            valid = F.pad(x.new_ones(1, h, w, 1), (0, 0, 0, pw, 0, ph))
            keys = window_partition(valid, win).view(-1, 1, 1, win[0] * win[1])  # (nW, 1, 1, n)
            pad = torch.zeros_like(keys).masked_fill_(keys == 0, float("-inf"))
            mask = pad if mask is None else pad + mask
            mask = mask.repeat(B, 1, 1, 1)  # windows are ordered image by image
        y = self._attend(window_partition(x, win), mask, win, 0)
        y = window_reverse(y, win, Hp, Wp)
        if ph or pw:
            y = y[:, :h, :w]
        return y.reshape(B, N, C)


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
        _check(cfg)
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.dim)
        self.grid = cfg.img_size // cfg.patch_size
        self.num_prefix_tokens = int(cfg.class_token) + int(cfg.distilled)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.grid ** 2, cfg.dim))
        # on the CPU explicitly: under a meta-device context (keel models) .tolist() would fail
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        rel_grid = (self.grid, self.grid) if cfg.rel_pos else None
        decomposed_grid = (self.grid, self.grid) if cfg.rel_pos_decomposed else None
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, r,
                  window=0 if i in cfg.global_blocks else cfg.window_size, rel_grid=rel_grid,
                  num_prefix=self.num_prefix_tokens, decomposed_grid=decomposed_grid)
            for i, r in enumerate(rates))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.num_features = cfg.dim
        self.feature_info = [{"stride": cfg.patch_size, "channels": cfg.dim}]
        self.head = nn.Linear(cfg.dim, num_classes) if num_classes else nn.Identity()
        if cfg.distilled:
            self.head_dist = nn.Linear(cfg.dim, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer, like MAE
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RelativePositionBias):
                # zero: pretrained weights without relative positions start out unchanged
                nn.init.zeros_(m.relative_position_bias_table)
            elif isinstance(m, DecomposedRelPosAttention):
                nn.init.zeros_(m.rel_pos_h)
                nn.init.zeros_(m.rel_pos_w)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position embedding of the patch tokens on an h x w grid: (1, h*w, D). The prefix
        tokens' positions are ``pos_embed[:, :num_prefix_tokens]`` (see :meth:`prefix_tokens`)."""
        return interpolate_pos_embed(self.pos_embed[:, self.num_prefix_tokens:], (self.grid, self.grid), (h, w))

    def prefix_tokens(self, batch: int) -> torch.Tensor | None:
        """The class (and distillation) tokens with their positions added: (batch, P, D), or None
        for a model without them."""
        if not self.num_prefix_tokens:
            return None
        tok = self.cls_token if self.dist_token is None else torch.cat([self.cls_token, self.dist_token], 1)
        return (tok + self.pos_embed[:, :self.num_prefix_tokens]).expand(batch, -1, -1)

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> normalized tokens (B, P + N, D): the ``num_prefix_tokens`` P prefix
        tokens (class, then distillation) first, then the patches row by row.

        ``mask`` (B, h, w) bool on the patch grid with ``mask_token`` (D,): SimMIM's input
        masking, the embeddings of the patches where ``mask`` is True are replaced by the token
        before the position embedding is added (so masked patches keep their position)."""
        hw = (x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size)
        x = self.patch_embed(x)
        if mask is not None:
            x = torch.where(mask.reshape(x.shape[0], -1, 1), mask_token.reshape(1, 1, -1).to(x.dtype), x)
        x = x + self.pos_embed_for(*hw)
        if self.num_prefix_tokens:
            x = torch.cat([self.prefix_tokens(x.shape[0]), x], dim=1)
        for blk in self.blocks:
            x = blk(x, hw)
        return self.norm(x)

    def forward_visible(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """MAE's encoder: only the patches ``keep`` (B, K) (indices into the row-by-row patch
        grid) go through the blocks, with the prefix tokens: (B, 3, H, W) -> normalized tokens
        (B, P + K, D), the kept patches in the order of ``keep``. Position embeddings are added
        before the patches are gathered, so each kept token carries its own position; no mask
        token enters the encoder. Needs global attention without relative positions (windows
        and relative position tables are laid out on the full grid)."""
        if self.cfg.window_size or self.cfg.rel_pos or self.cfg.rel_pos_decomposed:
            raise ValueError("forward_visible runs a subset of the patches: it needs a ViT without "
                             "windowed attention (window_size=0), rel_pos and rel_pos_decomposed")
        hw = (x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size)
        x = self.patch_embed(x) + self.pos_embed_for(*hw)
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if self.num_prefix_tokens:
            x = torch.cat([self.prefix_tokens(x.shape[0]), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """SimMIM's encoder: :meth:`forward_tokens` with ``mask`` (B, h, w) and ``mask_token``
        (D,), the patch tokens as a (B, D, h, w) map (stride ``patch_size``)."""
        h, w = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        t = self.forward_tokens(x, mask, mask_token)[:, self.num_prefix_tokens:]
        return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)

    def last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, (B, heads, P + N, P + N): row 0 is where the
        class token looks (DINO's attention maps). Needs a last block with global attention."""
        last = self.blocks[-1]
        if last.window:
            raise ValueError("the last block attends within windows: no global attention map to show")
        hw = (x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size)
        x = self.patch_embed(x) + self.pos_embed_for(*hw)
        if self.num_prefix_tokens:
            x = torch.cat([self.prefix_tokens(x.shape[0]), x], dim=1)
        for blk in self.blocks[:-1]:
            x = blk(x, hw)
        return last.attention_weights(x, hw)

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.global_pool == "avg":
            return t[:, self.num_prefix_tokens:].mean(1)
        return t[:, 0] if self.dist_token is None else (t[:, 0] + t[:, 1]) / 2

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(self.forward_tokens(x))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.forward_masked(x)]

    def forward(self, x):
        if self.dist_token is None or isinstance(self.head, nn.Identity):
            return self.head(self.embed(x))
        t = self.forward_tokens(x)
        logits, logits_dist = self.head(t[:, 0]), self.head_dist(t[:, 1])
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2


def _check(cfg: ViTConfig) -> None:
    if cfg.img_size % cfg.patch_size:
        lo = cfg.img_size // cfg.patch_size * cfg.patch_size
        raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch size {cfg.patch_size}: "
                         f"use {lo or cfg.patch_size} or {lo + cfg.patch_size}")
    if cfg.global_pool not in POOLS:
        raise ValueError(f"global_pool must be 'token' or 'avg', not {cfg.global_pool!r}")
    if cfg.global_pool == "token" and not cfg.class_token:
        raise ValueError("global_pool='token' needs the class token; use global_pool='avg'")
    if cfg.distilled and not (cfg.class_token and cfg.global_pool == "token"):
        raise ValueError("a distilled model reads its class and distillation tokens: "
                         "it needs class_token=True and global_pool='token'")
    if cfg.window_size > 0 and cfg.class_token:
        raise ValueError("windowed attention (ViTDet) runs on patch tokens only: "
                         "pass class_token=False, global_pool='avg'")
    bad = [i for i in cfg.global_blocks if not 0 <= i < cfg.depth]
    if bad:
        raise ValueError(f"global_blocks {bad} are not block indices of a depth-{cfg.depth} model")


def _build(cfg: ViTConfig, num_classes: int, kwargs: dict) -> VisionTransformer:
    if "global_blocks" in kwargs:
        kwargs = {**kwargs, "global_blocks": tuple(kwargs["global_blocks"])}  # lists from YAML
    return VisionTransformer(replace(cfg, **kwargs), num_classes)


_TINY = ViTConfig(dim=192, num_heads=3)
_SMALL = ViTConfig(dim=384, num_heads=6)
_BASE = ViTConfig()
_LARGE = ViTConfig(dim=1024, depth=24, num_heads=16)


@register_model
def vit_tiny_patch16(num_classes: int = 0, **kw):
    return _build(_TINY, num_classes, kw)


@register_model
def vit_small_patch16(num_classes: int = 0, **kw):
    return _build(_SMALL, num_classes, kw)


@register_model
def vit_base_patch16(num_classes: int = 0, **kw):
    return _build(_BASE, num_classes, kw)


@register_model
def vit_large_patch16(num_classes: int = 0, **kw):
    return _build(_LARGE, num_classes, kw)


@register_model
def vit_small_patch8(num_classes: int = 0, **kw):
    return _build(replace(_SMALL, patch_size=8), num_classes, kw)


@register_model
def vit_base_patch8(num_classes: int = 0, **kw):
    return _build(replace(_BASE, patch_size=8), num_classes, kw)


@register_model
def vit_large_patch14(num_classes: int = 0, **kw):
    return _build(replace(_LARGE, patch_size=14), num_classes, kw)


@register_model
def vit_tiny_patch4_32(num_classes: int = 0, **kw):
    """ViT-Tiny for 32 px images: patch 4 (8x8 tokens), 6 blocks — a small ViT for CPU runs."""
    return _build(ViTConfig(img_size=32, patch_size=4, dim=192, depth=6, num_heads=3), num_classes, kw)


@register_model
def deit_tiny_patch16(num_classes: int = 0, **kw):
    return _build(_TINY, num_classes, kw)


@register_model
def deit_small_patch16(num_classes: int = 0, **kw):
    return _build(_SMALL, num_classes, kw)


@register_model
def deit_base_patch16(num_classes: int = 0, **kw):
    return _build(_BASE, num_classes, kw)


@register_model
def deit_tiny_distilled_patch16(num_classes: int = 0, **kw):
    return _build(replace(_TINY, distilled=True), num_classes, kw)


@register_model
def deit_small_distilled_patch16(num_classes: int = 0, **kw):
    return _build(replace(_SMALL, distilled=True), num_classes, kw)


@register_model
def deit_base_distilled_patch16(num_classes: int = 0, **kw):
    return _build(replace(_BASE, distilled=True), num_classes, kw)


# ---------------------------------------------------------------- timm interoperability
# Each model's timm counterpart at its default resolution (at another one, e.g. timm's
# deit_base_patch16_384, build keel's model with img_size=384: the keys are the same).
TIMM_NAMES = {
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_small_patch8": "vit_small_patch8_224",
    "vit_base_patch8": "vit_base_patch8_224",
    "vit_large_patch14": "vit_large_patch14_224",
    "deit_tiny_patch16": "deit_tiny_patch16_224",
    "deit_small_patch16": "deit_small_patch16_224",
    "deit_base_patch16": "deit_base_patch16_224",
    "deit_tiny_distilled_patch16": "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16": "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16": "deit_base_distilled_patch16_224",
}

# keel's ViT keeps timm's parameter names and layouts (pos_embed includes the prefix tokens'
# entries, qkv is one fused linear), so converting is checking that every key is one that both
# sides have: anything else (timm's layer scale, register tokens, fc_norm; keel's relative
# position tables) has no counterpart and must not pass silently.
_SHARED_KEYS = re.compile(
    r"(cls_token|dist_token|pos_embed"
    r"|patch_embed\.proj\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|norm\.(weight|bias)|head\.(weight|bias)|head_dist\.(weight|bias))")


def _shared(sd: dict, name: str, side: str) -> dict:
    unknown = [k for k in sd if not _SHARED_KEYS.fullmatch(k)]
    if unknown:
        raise ValueError(f"{side} keys with no counterpart for '{name}': {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    return dict(sd)


def from_timm_state_dict(sd: dict, name: str) -> dict:
    """A timm ViT/DeiT state dict (``TIMM_NAMES[name]``) -> keel's."""
    return _shared(sd, name, "timm")


def to_timm_state_dict(sd: dict, name: str) -> dict:
    """keel's state dict of a ViT/DeiT -> timm's (a model built with rel_pos or
    rel_pos_decomposed has none: its tables have no counterpart in timm's ViT)."""
    return _shared(sd, name, "keel")
