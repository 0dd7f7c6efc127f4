"""Convolution building blocks: weight-standardized conv (BiT), conv-norm-act, squeeze-excite,
and EfficientNet's MBConv / FusedMBConv blocks.

Each block takes its channel counts first and its normalisation / activation as classes, so a
model can swap BatchNorm for GroupNorm (small batches) without touching the block.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.models.layers.drop import DropPath


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round a channel count to the nearest multiple of ``divisor``, never losing more than 10%
    (EfficientNet's rule, so that expanded widths match timm's and its checkpoints)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def cpu_safe_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                    dilation, groups: int) -> torch.Tensor:
    """``F.conv2d``, except that an unpadded strided 1x1 convolution of fewer than 16 input
    channels on the CPU is computed as what it is: a 1x1 convolution of the subsampled input
    (the same products and sums).

    Why: oneDNN's strided 1x1 weight gradient on NHWC inputs with fewer input channels than its
    register block (16 with AVX-512, 8 with AVX2) writes past its workspace
    (uxlfoundation/oneDNN#6035): wrong weight gradients, a corrupted heap or a hang, depending on
    the machine. On this project's CPUs ``resnet10_cifar(widths=(8, 8, 16, 16))`` at 64 px died
    in its first backward pass with "free(): invalid next size"; 16 or more input channels were
    right on every shape tried. Wider convolutions keep oneDNN's kernel, which is up to 2x faster
    than subsampling first.
    """
    if x.device.type == "cpu" and weight.shape[1] * groups < 16 and weight.shape[-2:] == (1, 1) and \
            tuple(stride) != (1, 1) and tuple(padding) == (0, 0):
        x, stride = x[..., ::stride[0], ::stride[1]], 1
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class CpuSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that runs through ``cpu_safe_conv2d``:
    for the strided 1x1 projection shortcuts of ResNets."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_safe_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardization (Qiao et al. 2019), as in BiT's ResNet-v2.

    Each output filter is shifted to zero mean and scaled to unit (biased) variance over its
    (in, kh, kw) weights before the convolution: ``w_hat = (w - mean) / sqrt(var + eps)``.
    ``eps`` defaults to 1e-8, the value timm uses for its BiT models (the official BiT code has
    1e-10; the two agree to float32 precision for any trained filter). Padding defaults to
    ``dilation * (k - 1) // 2`` ("same" for odd kernels at stride 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1, bias: bool = False,
                 eps: float = 1e-8):
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        # batch_norm over a (1, out, in*kh*kw) view computes exactly the per-filter standardization
        # in one fused kernel (forward and backward); measured faster on CPU than
        # var_mean + sub + rsqrt + mul, which makes four passes and keeps more tensors for backward.
        w = self.weight
        return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0,
                            eps=self.eps).reshape_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_safe_conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                               self.dilation, self.groups)

    def extra_repr(self):
        return super().extra_repr() + f", eps={self.eps}"


class ConvNormAct(nn.Module):
    """conv (no bias) -> norm -> activation; ``act=None`` leaves the output linear."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 act: Callable[..., nn.Module] | None = nn.SiLU,
                 norm: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False)
        self.norm = norm(cout)
        self.act = act(inplace=True) if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as in EfficientNet: global average -> 1x1 conv
    reduce -> SiLU -> 1x1 conv expand -> sigmoid gate scaling each channel of the input.

    ``rd_channels`` (the bottleneck width) defaults to ``round(channels * rd_ratio)``; the
    EfficientNet blocks below pass it explicitly, computed from the block's *input* channels.
    """

    def __init__(self, channels: int, rd_ratio: float = 0.25, rd_channels: int | None = None,
                 act: Callable[..., nn.Module] = nn.SiLU):
        super().__init__()
        rd_channels = rd_channels or max(1, round(channels * rd_ratio))
        self.reduce = nn.Conv2d(channels, rd_channels, 1)
        self.act = act(inplace=True)
        self.expand = nn.Conv2d(rd_channels, channels, 1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel weights in (0, 1), shape (B, C, 1, 1)."""
        s = x.mean((2, 3), keepdim=True)
        return self.expand(self.act(self.reduce(s))).sigmoid()

    def forward(self, x):
        return x * self.gate(x)


def _se_width(cin: int, se_ratio: float) -> int:
    # EfficientNet sizes the SE bottleneck from the block input, not from the expanded width
    return max(1, round(cin * se_ratio))


class _Residual(nn.Module):
    """Shared tail of the EfficientNet blocks: residual (with drop-path) only when shapes allow."""

    def _setup_residual(self, cin: int, cout: int, stride: int, drop_path: float, last_norm: nn.Module,
                        zero_init_last: bool) -> None:
        self.has_skip = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path) if self.has_skip else nn.Identity()
        # Zero gamma on the last norm makes a residual block the identity at init. Blocks without
        # a skip keep gamma = 1: a zero there would output a constant and cut the gradient to
        # everything before it on the first step.
        if zero_init_last and self.has_skip:
            nn.init.zeros_(last_norm.weight)

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(out) if self.has_skip else out


class MBConv(_Residual):
    """Inverted residual (MobileNetV2 / EfficientNet): 1x1 expand -> norm -> SiLU -> depth-wise
    kxk (stride) -> norm -> SiLU -> SE -> 1x1 project -> norm, plus the input when stride is 1
    and ``cin == cout``. With ``expand_ratio == 1`` there is no expand conv (EfficientNet's
    depth-wise separable block). The expanded width is ``make_divisible(cin * expand_ratio)``.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, expand_ratio: float = 4, se_ratio: float = 0.25,
                 drop_path: float = 0.0, norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act: Callable[..., nn.Module] = nn.SiLU, kernel_size: int = 3, zero_init_last: bool = True):
        super().__init__()
        mid = make_divisible(cin * expand_ratio) if expand_ratio != 1 else cin
        self.expand = ConvNormAct(cin, mid, 1, act=act, norm=norm) if expand_ratio != 1 else nn.Identity()
        self.dw = ConvNormAct(mid, mid, kernel_size, stride, groups=mid, act=act, norm=norm)
        self.se = SqueezeExcite(mid, rd_channels=_se_width(cin, se_ratio), act=act) if se_ratio > 0 else nn.Identity()
        self.project = ConvNormAct(mid, cout, 1, act=None, norm=norm)
        self._setup_residual(cin, cout, stride, drop_path, self.project.norm, zero_init_last)

    def forward(self, x):
        return self._finish(self.project(self.se(self.dw(self.expand(x)))), x)


class FusedMBConv(_Residual):
    """EfficientNetV2's fused inverted residual: kxk expand conv (stride) -> norm -> SiLU ->
    (SE) -> 1x1 project -> norm. With ``expand_ratio == 1`` it is a single kxk conv -> norm ->
    SiLU (then SE if asked). Residual as in MBConv.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, expand_ratio: float = 4, se_ratio: float = 0.0,
                 drop_path: float = 0.0, norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act: Callable[..., nn.Module] = nn.SiLU, kernel_size: int = 3, zero_init_last: bool = True):
        super().__init__()
        if expand_ratio == 1:
            self.expand = ConvNormAct(cin, cout, kernel_size, stride, act=act, norm=norm)
            self.se = SqueezeExcite(cout, rd_channels=_se_width(cin, se_ratio), act=act) if se_ratio > 0 else nn.Identity()
            self.project = nn.Identity()
            last_norm = self.expand.norm  # SiLU(0) = 0, so a zero gamma still gives the identity
        else:
            mid = make_divisible(cin * expand_ratio)
            self.expand = ConvNormAct(cin, mid, kernel_size, stride, act=act, norm=norm)
            self.se = SqueezeExcite(mid, rd_channels=_se_width(cin, se_ratio), act=act) if se_ratio > 0 else nn.Identity()
            self.project = ConvNormAct(mid, cout, 1, act=None, norm=norm)
            last_norm = self.project.norm
        self._setup_residual(cin, cout, stride, drop_path, last_norm, zero_init_last)

    def forward(self, x):
        return self._finish(self.project(self.se(self.expand(x))), x)
