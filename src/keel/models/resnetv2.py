"""BiT ResNet-v2 (Kolesnikov et al. 2020): pre-activation bottlenecks, GroupNorm + weight
standardization everywhere, so that it trains (and transfers) at any batch size.

Each block normalises and activates its input first (GroupNorm(32) + ReLU before every
StdConv2d); the projection shortcut of a stage's first block reads that pre-activated input.
Because of that the stage outputs are raw residual sums: the network ends with one GroupNorm +
ReLU, which ``feature_maps`` applies to the last map only (as timm's ``forward_features``).

The ImageNet stem is BiT's: StdConv2d 7x7 stride 2, then a zero pad of 1 and a 3x3 max-pool of
stride 2 without padding (timm's ``stem_type='fixed'``, the TF "SAME" approximation the
checkpoints were trained with). The width factor multiplies every channel count.
On the CPU the network runs in channels-last (NHWC) layout, about 10% faster for a training
step than NCHW; ``feature_maps`` still hands back contiguous NCHW tensors.
Weights convert to and from timm's ``resnetv2_*_bit`` models (``from_timm_state_dict``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.models.layers import DropPath
from keel.models.layers.conv import StdConv2d
from keel.models.registry import register_model


@dataclass(frozen=True)
class ResNetV2Config:
    depths: tuple[int, ...] = (3, 4, 6, 3)
    width_factor: int = 1
    stem: str = "bit"               # bit: 7x7 s2 + pad + 3x3 max-pool s2 | cifar: 3x3 s1, no pool
    stem_width: int = 64            # times width_factor
    widths: tuple[int, ...] = (256, 512, 1024, 2048)  # stage outputs, times width_factor
    bottleneck_ratio: float = 0.25
    gn_groups: int = 32
    ws_eps: float = 1e-8            # timm's BiT value (official code: 1e-10)
    drop_path_rate: float = 0.0
    cpu_channels_last: bool = True  # run CPU forward/backward in NHWC (faster oneDNN convolutions)
    img_size: int = 224             # only recorded: any multiple of the total stride works


class GroupNormReLU(nn.GroupNorm):
    """GroupNorm then ReLU in place; the parameters keep GroupNorm's names (weight, bias)."""

    def forward(self, x):
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps), inplace=True)


class PreActBottleneck(nn.Module):
    """norm1 -> conv1 1x1 -> norm2 -> conv2 3x3 (stride) -> norm3 -> conv3 1x1, plus the shortcut:
    the input itself, or a strided 1x1 StdConv2d of the pre-activated input when the shape changes."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int, groups: int, eps: float, drop_path: float):
        super().__init__()
        self.downsample = StdConv2d(cin, cout, 1, stride, eps=eps) if (stride != 1 or cin != cout) else None
        self.norm1 = GroupNormReLU(groups, cin)
        self.conv1 = StdConv2d(cin, mid, 1, eps=eps)
        self.norm2 = GroupNormReLU(groups, mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride, eps=eps)
        self.norm3 = GroupNormReLU(groups, mid)
        self.conv3 = StdConv2d(mid, cout, 1, eps=eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        pre = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(pre)))))
        return shortcut + self.drop_path(out)


class BiTStem(nn.Module):
    def __init__(self, cout: int, kind: str, eps: float):
        super().__init__()
        if kind not in ("bit", "cifar"):
            raise ValueError(f"unknown stem '{kind}' (bit | cifar)")
        self.kind = kind
        self.conv = StdConv2d(3, cout, 7, 2, eps=eps) if kind == "bit" else StdConv2d(3, cout, 3, 1, eps=eps)
        self.stride = 4 if kind == "bit" else 1

    def forward(self, x):
        x = self.conv(x)
        if self.kind == "bit":
            # zeros, not -inf: the stem output is not activated yet, so the pad can win the max
            x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2)
        return x


class ResNetV2(nn.Module):
    def __init__(self, cfg: ResNetV2Config, num_classes: int = 0):
        super().__init__()
        self.cfg = cfg
        wf, eps = cfg.width_factor, cfg.ws_eps
        cin = cfg.stem_width * wf
        self.stem = BiTStem(cin, cfg.stem, eps)
        stride = self.stem.stride
        # on the CPU explicitly: under a meta-device context (keel models) .tolist() would fail
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        stages, i, self.feature_info = [], 0, []
        for s, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            cout = width * wf
            mid = int(cout * cfg.bottleneck_ratio)
            blocks = []
            for d in range(depth):
                st = 2 if (d == 0 and s > 0) else 1
                blocks.append(PreActBottleneck(cin, cout, mid, st, cfg.gn_groups, eps, rates[i]))
                cin, i = cout, i + 1
            stride *= 2 if s > 0 else 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append({"stride": stride, "channels": cout})
        self.stages = nn.ModuleList(stages)
        self.norm = GroupNormReLU(cfg.gn_groups, cin)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes) if num_classes else nn.Identity()
        self._init_weights()
        if cfg.cpu_channels_last:
            # the weights in the layout of the NHWC activations, so that their gradients come out
            # in the parameters' own strides (DDP's buckets follow them)
            self.to(memory_format=torch.channels_last)

    def _init_weights(self):
        # timm's BiT init (no zero-init of the last conv: a zero filter has no variance to
        # standardize, and WS would blow its gradient up by 1/sqrt(eps))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN's CPU convolutions (forward and backward) run faster on NHWC activations, and
        # every later layer keeps the layout of its input; GPUs keep NCHW.
        if self.cfg.cpu_channels_last and x.device.type == "cpu":
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the final normalized, activated map (B, D, H/32, W/32)."""
        x = self.stem(self._layout(x))
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs; the earlier ones are raw pre-activation sums, the last one has the final
        GroupNorm + ReLU applied (it is what the head sees). Always contiguous NCHW."""
        x = self.stem(self._layout(x))
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        maps[-1] = self.norm(maps[-1])
        return [m.contiguous() for m in maps]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean((2, 3))

    def forward(self, x):
        return self.head(self.embed(x))


def _build(cfg: ResNetV2Config, num_classes: int, kwargs: dict) -> ResNetV2:
    return ResNetV2(replace(cfg, **kwargs), num_classes)


# timm registers exactly these six BiT sizes
@register_model
def resnetv2_50x1_bit(num_classes: int = 0, **kw) -> ResNetV2:
    """BiT R50x1: 25.55M parameters with a 1000-class head."""
    return _build(ResNetV2Config(depths=(3, 4, 6, 3), width_factor=1), num_classes, kw)


@register_model
def resnetv2_50x3_bit(num_classes: int = 0, **kw) -> ResNetV2:
    return _build(ResNetV2Config(depths=(3, 4, 6, 3), width_factor=3), num_classes, kw)


@register_model
def resnetv2_101x1_bit(num_classes: int = 0, **kw) -> ResNetV2:
    return _build(ResNetV2Config(depths=(3, 4, 23, 3), width_factor=1), num_classes, kw)


@register_model
def resnetv2_101x3_bit(num_classes: int = 0, **kw) -> ResNetV2:
    """BiT R101x3: 387.9M parameters with a 1000-class head."""
    return _build(ResNetV2Config(depths=(3, 4, 23, 3), width_factor=3), num_classes, kw)


@register_model
def resnetv2_152x2_bit(num_classes: int = 0, **kw) -> ResNetV2:
    return _build(ResNetV2Config(depths=(3, 8, 36, 3), width_factor=2), num_classes, kw)


@register_model
def resnetv2_152x4_bit(num_classes: int = 0, **kw) -> ResNetV2:
    """BiT R152x4: 936.5M parameters with a 1000-class head."""
    return _build(ResNetV2Config(depths=(3, 8, 36, 3), width_factor=4), num_classes, kw)


@register_model
def resnetv2_26x1_cifar(num_classes: int = 0, **kw) -> ResNetV2:
    """A BiT-style ResNet-v2 for 28-64 px images: two bottlenecks per stage (26 layers), a 3x3
    stride-1 stem without max-pool, so the feature strides are 1, 2, 4, 8. No timm counterpart."""
    return _build(ResNetV2Config(depths=(2, 2, 2, 2), stem="cifar", img_size=32), num_classes, kw)


@register_model
def resnetv2_14_tiny_cifar(num_classes: int = 0, **kw) -> ResNetV2:
    """A BiT-style ResNet-v2 small enough for CPU experiments (0.5M parameters): one bottleneck per
    stage (14 layers), a quarter of BiT's widths (64-512), 8 GroupNorm groups, the cifar stem.
    Same blocks (GN + WS pre-activation) as the real BiT sizes. No timm counterpart."""
    return _build(ResNetV2Config(depths=(1, 1, 1, 1), stem="cifar", stem_width=16, widths=(64, 128, 256, 512),
                                 gn_groups=8, img_size=32), num_classes, kw)


# --- timm interoperability -------------------------------------------------------------------
# keel: stages.{s}.{b}.<layer>, downsample is the StdConv2d itself, head is nn.Linear.
# timm: stages.{s}.blocks.{b}.<layer>, downsample.conv, head.fc is a 1x1 Conv2d.

def from_timm_state_dict(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".downsample.conv.", ".downsample.")
        if k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
            if v.ndim == 4:
                v = v.flatten(1)
        out[k] = v
    return out


def to_timm_state_dict(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace(".downsample.", ".downsample.conv.")
        if k.startswith("head."):
            k = "head.fc." + k[len("head."):]
            if v.ndim == 2:
                v = v[:, :, None, None]
        out[k] = v
    return out
