"""Classic ResNet (He et al. 2016) with BatchNorm, in its CIFAR form for small images.

The CIFAR stem (3x3 conv, stride 1, no max-pool) keeps 28-64 px images from shrinking to
nothing; it is also what self-supervised baselines on CIFAR/Fashion-MNIST use, so keel's
numbers compare one to one. (BiT's ResNet-v2 with GroupNorm + WS lives in resnetv2.py.)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from keel.models.layers import DropPath
from keel.models.layers.conv import CpuSafeConv2d
from keel.models.registry import register_model


@dataclass(frozen=True)
class ResNetConfig:
    depths: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem: str = "cifar"             # cifar: 3x3 s1 | imagenet: 7x7 s2 + max-pool
    drop_path_rate: float = 0.0
    cpu_channels_last: bool = True  # run CPU forward/backward in NHWC (faster oneDNN convolutions)
    img_size: int = 32              # only recorded: any size works


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        nn.init.zeros_(self.bn2.weight)  # each block starts as identity: trains faster and stabler
        self.act = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(CpuSafeConv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(self.shortcut(x) + self.drop_path(out))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig, num_classes: int = 0):
        super().__init__()
        self.cfg = cfg
        w0 = cfg.widths[0]
        if cfg.stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
            stride = 1
        elif cfg.stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
            stride = 4
        else:
            raise ValueError(f"unknown stem '{cfg.stem}' (cifar | imagenet)")
        # on the CPU explicitly: under a meta-device context (keel models) .tolist() would fail
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        stages, cin, i, self.feature_info = [], w0, 0, []
        for s, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            blocks = []
            for d in range(depth):
                st = 2 if (d == 0 and s > 0) else 1
                blocks.append(BasicBlock(cin, width, st, rates[i]))
                cin, i = width, i + 1
            stride *= 2 if s > 0 else 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append({"stride": stride, "channels": width})
        self.stages = nn.ModuleList(stages)
        self.num_features = cin
        self.head = nn.Linear(cin, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if cfg.cpu_channels_last:
            # the weights in the layout of the NHWC activations, so that their gradients come out
            # in the parameters' own strides (DDP's buckets follow them)
            self.to(memory_format=torch.channels_last)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN's CPU convolutions run forward and backward about 1.35x faster on NHWC activations
        # (resnet10_cifar, batch 256, 24 px), and every later layer keeps its input's layout;
        # GPUs keep NCHW unless the trainer's channels_last converts the model.
        if self.cfg.cpu_channels_last and x.device.type == "cpu":
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(self._layout(x))
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self._layout(x))
        for stage in self.stages:
            x = stage(x)
        return x.mean((2, 3))

    def forward(self, x):
        return self.head(self.embed(x))


def _build(cfg: ResNetConfig, num_classes: int, kwargs: dict) -> ResNet:
    return ResNet(replace(cfg, **kwargs), num_classes)


@register_model
def resnet18_cifar(num_classes: int = 0, **kw) -> ResNet:
    """ResNet-18 with the CIFAR stem: 11.2M params, the usual SSL baseline for 32 px data."""
    return _build(ResNetConfig(), num_classes, kw)


@register_model
def resnet10_cifar(num_classes: int = 0, **kw) -> ResNet:
    """One block per stage, half width: a fast backbone for CPU runs and the demo."""
    return _build(ResNetConfig(depths=(1, 1, 1, 1), widths=(32, 64, 128, 256)), num_classes, kw)


@register_model
def resnet18(num_classes: int = 0, **kw) -> ResNet:
    """Standard ImageNet ResNet-18 (7x7 stem + max-pool) with zero-init residual BN."""
    return _build(ResNetConfig(stem="imagenet", img_size=224), num_classes, kw)
