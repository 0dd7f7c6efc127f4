"""Swin Transformer (Liu et al. 2021): attention in 7x7 windows, shifted by 3 on every other
block, and 2x2 patch merging between four stages at strides 4, 8, 16, 32.

Any input whose sides are multiples of 32 works: stages pad their maps to a multiple of the
window, and a map no larger than the window is attended as one window (e.g. the 5x5 last
stage of a 160 px input). Padding follows the official Swin (pad, then roll); timm rolls then
pads, so on inputs that need padding the two differ (at 224 px nothing is padded and they agree).

Layout and names: ``stages.{i}`` holds the patch merging that opens it (``downsample``, stages
1-3) and its ``blocks``, like timm >= 0.9, so converting checkpoints is a key rename.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from keel.models.layers.init import init_linear_trunc_normal
from keel.models.layers.window_attention import PatchMerging, SwinBlock
from keel.models.registry import register_model


@dataclass(frozen=True)
class SwinConfig:
    img_size: int = 224             # only recorded: any multiple of 32 works
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    rel_pos: bool = True            # relative position bias in every window attention
    conv_qkv: bool = False          # depth-wise 3x3 conv on the normalized map before attention
    layer_scale: float | None = None  # per-channel residual scale, initialised to this value


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> (B, H/p, W/p, C), then LayerNorm."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, downsample: bool,
                 drop_paths: list[float], cfg: SwinConfig):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        w = cfg.window_size
        self.blocks = nn.Sequential(*(
            SwinBlock(dim, num_heads, w, 0 if d % 2 == 0 else w // 2, cfg.mlp_ratio, drop_paths[d],
                      rel_pos=cfg.rel_pos, conv_qkv=cfg.conv_qkv, layer_scale=cfg.layer_scale,
                      qkv_bias=cfg.qkv_bias)
            for d in range(depth)))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class SwinTransformer(nn.Module):
    def __init__(self, cfg: SwinConfig, num_classes: int = 0):
        super().__init__()
        if len(cfg.depths) != len(cfg.num_heads):
            raise ValueError(f"depths {cfg.depths} and num_heads {cfg.num_heads} differ in length")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        # on the CPU explicitly: under a meta-device context (keel models) .tolist() would fail
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        stages, self.feature_info = [], []
        in_dim, stride, i = cfg.embed_dim, cfg.patch_size, 0
        for s, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            dim = cfg.embed_dim * 2 ** s
            stride *= 2 if s else 1
            stages.append(SwinStage(in_dim, dim, depth, heads, s > 0, rates[i:i + depth], cfg))
            self.feature_info.append({"stride": stride, "channels": dim})
            in_dim, i = dim, i + depth
        self.stages = nn.ModuleList(stages)
        self.num_features = in_dim
        self.norm = nn.LayerNorm(in_dim)
        self.head = nn.Linear(in_dim, num_classes) if num_classes else nn.Identity()
        init_linear_trunc_normal(self)

    def _stage_outputs(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        if mask is not None:  # SimMIM: masked patches (after the embedding's norm) become the token
            x = torch.where(mask.unsqueeze(-1), mask_token.reshape(1, 1, 1, -1).to(x.dtype), x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the normalized last-stage map, (B, H/32, W/32, D) channels last."""
        return self.norm(self._stage_outputs(x)[-1])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean((1, 2))

    def feature_maps(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                     mask_token: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each stage's output (before the next stage's patch merging) as (B, C, H, W) at strides
        4, 8, 16, 32, in channels-last memory (permuted views, no copy). The final LayerNorm exists
        for the last stage only, so only the last map is normalized (as timm's forward_features
        and forward_intermediates(norm=True)).

        ``mask`` (B, H/4, W/4) bool with ``mask_token`` (embed_dim,): SimMIM's input masking, the
        patch embeddings where ``mask`` is True are replaced by the token before the first stage."""
        outs = self._stage_outputs(x, mask, mask_token)
        outs[-1] = self.norm(outs[-1])
        return [o.permute(0, 3, 1, 2) for o in outs]

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """SimMIM's encoder: the normalized last map of :meth:`feature_maps` (masked as there),
        (B, C, H/32, W/32)."""
        return self.feature_maps(x, mask, mask_token)[-1]

    def forward(self, x):
        return self.head(self.embed(x))


def _build(cfg: SwinConfig, num_classes: int, kwargs: dict) -> SwinTransformer:
    return SwinTransformer(replace(cfg, **kwargs), num_classes)


@register_model
def swin_tiny(num_classes: int = 0, **kw):
    """Swin-T: 28.3M parameters with a 1000-class head."""
    return _build(SwinConfig(), num_classes, kw)


@register_model
def swin_small(num_classes: int = 0, **kw):
    """Swin-S: 49.6M parameters with a 1000-class head."""
    return _build(SwinConfig(depths=(2, 2, 18, 2)), num_classes, kw)


@register_model
def swin_base(num_classes: int = 0, **kw):
    """Swin-B: 87.8M parameters with a 1000-class head."""
    return _build(SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), num_classes, kw)


# timm counterparts: swin_{tiny,small,base}_patch4_window7_224. Both sides name most things
# alike; keel groups the bias table under ``attn.rel_pos`` and has a bare ``head`` Linear.
_TIMM_TO_KEEL = [
    (r"^layers\.", "stages."),
    (r"\.attn\.relative_position_bias_table$", ".attn.rel_pos.relative_position_bias_table"),
    (r"^head\.fc\.", "head."),
]
_KEEL_TO_TIMM = [
    (r"^stages\.", "layers."),
    (r"\.attn\.rel_pos\.relative_position_bias_table$", ".attn.relative_position_bias_table"),
    (r"^head\.", "head.fc."),
]
# buffers timm recomputes (and older checkpoints still carry); keel recomputes them too
_DROPPED = ("relative_position_index", "attn_mask")


def _rename(key: str, table) -> str:
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def from_timm_state_dict(sd: dict, name: str) -> dict:
    """timm Swin state dict -> keel's. Also takes the official layout (timm < 0.9 and the
    Microsoft checkpoints), where stage i ends with the merging that timm now opens stage i+1
    with, and whose head is a bare ``head`` Linear."""
    official = "layers.0.downsample.reduction.weight" in sd
    out = {}
    for k, v in sd.items():
        if k.endswith(_DROPPED):
            continue
        if official:
            k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
            k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[_rename(k, _TIMM_TO_KEEL)] = v
    return out


def to_timm_state_dict(sd: dict, name: str) -> dict:
    """keel Swin state dict -> the one timm's current Swin loads (``strict=True``)."""
    extra = [k for k in sd if re.search(r"\.(dwconv|gamma[12])\b", k)]
    if extra:
        raise ValueError(f"timm's Swin has no place for keel's conv_qkv / layer_scale weights ({extra[0]}, ...)")
    return {_rename(k, _KEEL_TO_TIMM): v for k, v in sd.items()}
