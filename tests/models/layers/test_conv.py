"""Convolution layers: weight standardization against its formula, squeeze-excite against a hand
computation, MBConv / FusedMBConv structure, residuals and identity at init, timm equivalence;
strided 1x1 convolutions that stay clear of oneDNN's NHWC weight-gradient bug."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.models.layers.conv import (ConvNormAct, CpuSafeConv2d, FusedMBConv, MBConv, SqueezeExcite, StdConv2d,
                                     make_divisible)


def randomize_norms(m: nn.Module) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval-mode checks mean something."""
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            with torch.no_grad():
                mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def test_make_divisible():
    assert make_divisible(96) == 96
    assert make_divisible(100) == 104      # nearest multiple of 8
    assert make_divisible(10) == 16        # 8 would lose more than 10%
    assert make_divisible(3) == 8          # never below the divisor


@pytest.mark.parametrize("eps", [1e-8, 0.5])
def test_std_conv_equals_the_formula(eps):
    torch.manual_seed(0)
    conv = StdConv2d(6, 8, 3, stride=2, groups=2, bias=True, eps=eps)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.2)  # far from standardized, so the normalisation is visible
        conv.bias.normal_()
    w = conv.weight
    mean = w.mean((1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean((1, 2, 3), keepdim=True)   # biased variance, as BiT
    w_hat = (w - mean) / torch.sqrt(var + eps)
    torch.testing.assert_close(conv.standardized_weight(), w_hat, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 6, 9, 9)
    expected = F.conv2d(x, w_hat, conv.bias, stride=2, padding=1, groups=2)
    out = conv(x)
    assert out.shape == (2, 8, 5, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if eps < 1e-3:
        wh = conv.standardized_weight()
        torch.testing.assert_close(wh.mean((1, 2, 3)), torch.zeros(8), atol=1e-6, rtol=0)
        torch.testing.assert_close(wh.var((1, 2, 3), unbiased=False), torch.ones(8), atol=1e-5, rtol=0)


def test_std_conv_ignores_filter_scale_and_shift_and_matches_timm():
    torch.manual_seed(0)
    conv = StdConv2d(4, 5, 3)
    assert conv.padding == (1, 1) and conv.eps == 1e-8 and conv.bias is None
    x = torch.randn(1, 4, 7, 7)
    ref = conv(x)
    assert ref.shape == (1, 5, 7, 7)
    with torch.no_grad():  # a per-filter affine change of the weights does not change the output
        conv.weight.mul_(torch.rand(5, 1, 1, 1) * 4 + 0.1).add_(torch.randn(5, 1, 1, 1))
    torch.testing.assert_close(conv(x), ref, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(conv(x).square().sum(), conv.weight)[0]
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0

    from timm.layers import StdConv2d as TimmStdConv2d
    t = TimmStdConv2d(4, 5, 3, eps=1e-8)
    t.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), t(x), rtol=1e-6, atol=1e-6)


# The shapes oneDNN gets wrong (uxlfoundation/oneDNN#6035): a strided 1x1 weight gradient on NHWC
# input with fewer input channels than its register block. Run in a child process: the unguarded
# kernel corrupts the heap (or hangs), which would take the test session down with it.
_NHWC_STRIDED_1X1 = textwrap.dedent("""
    import torch
    from keel.models.layers.conv import CpuSafeConv2d, StdConv2d
    torch.set_num_threads(1)
    for cls in (CpuSafeConv2d, StdConv2d):
        for cin, cout, side in [(3, 6, 64), (8, 8, 48), (8, 16, 64), (12, 24, 96), (16, 32, 64)]:  # 16: oneDNN
            torch.manual_seed(0)
            conv = cls(cin, cout, 1, stride=2, bias=False)
            x = torch.randn(8, cin, side, side)
            g = torch.randn(8, cout, side // 2, side // 2)
            grads = []
            for mkldnn, fmt in ((False, torch.contiguous_format), (True, torch.channels_last)):
                torch.backends.mkldnn.enabled = mkldnn   # off: PyTorch's own kernels, the reference
                conv.zero_grad()
                xi = x.clone(memory_format=fmt).requires_grad_()
                conv(xi).backward(g.contiguous(memory_format=fmt))
                grads.append((conv.weight.grad.clone(), xi.grad.clone()))
            (w0, x0), (w1, x1) = grads
            torch.testing.assert_close(w1, w0, rtol=1e-4, atol=1e-3)  # sums of 8k products, ~100
            torch.testing.assert_close(x1, x0, rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_strided_1x1_weight_gradient_is_right_on_nhwc_cpu_input():
    run = subprocess.run([sys.executable, "-c", _NHWC_STRIDED_1X1], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


@pytest.mark.parametrize("stride, padding, side", [(2, 0, 9), (3, 0, 10), ((2, 1), 0, 7), (2, 1, 8), (1, 0, 6)])
def test_cpu_safe_conv_is_nn_conv(stride, padding, side):
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 6, 1, stride, padding, bias=True)
    conv = CpuSafeConv2d(4, 6, 1, stride, padding, bias=True)
    conv.load_state_dict(ref.state_dict())   # the same parameters under the same names
    x = torch.randn(2, 4, side, side + 1, requires_grad=True)
    out, want = conv(x), ref(x)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, conv.weight))
    rx, rw = torch.autograd.grad(want.square().sum(), (x, ref.weight))
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_conv_norm_act():
    torch.manual_seed(0)
    m = ConvNormAct(4, 6, 3, stride=2).eval()
    randomize_norms(m)
    x = torch.randn(2, 4, 8, 8)
    expected = F.silu(m.norm(F.conv2d(x, m.conv.weight, stride=2, padding=1)))
    torch.testing.assert_close(m(x), expected)
    assert m.conv.bias is None
    lin = ConvNormAct(4, 6, 1, act=None).eval()
    torch.testing.assert_close(lin(x), lin.norm(lin.conv(x)))


def test_squeeze_excite_gate_is_the_hand_computation():
    torch.manual_seed(0)
    se = SqueezeExcite(16, rd_ratio=0.25)
    assert se.reduce.out_channels == 4 and se.expand.out_channels == 16
    assert SqueezeExcite(16, rd_channels=3).reduce.out_channels == 3
    with torch.no_grad():
        for p in se.parameters():
            p.normal_(0, 2.0)   # big weights: the sigmoid gets to both of its tails
    x = torch.randn(3, 16, 5, 7)
    s = x.mean((2, 3))                                            # (B, C)
    h = F.silu(s @ se.reduce.weight[:, :, 0, 0].T + se.reduce.bias)
    gate = torch.sigmoid(h @ se.expand.weight[:, :, 0, 0].T + se.expand.bias)
    g = se.gate(x)
    assert g.shape == (3, 16, 1, 1)
    assert (g > 0).all() and (g < 1).all()
    assert g.min() < 0.1 and g.max() > 0.9
    torch.testing.assert_close(g[:, :, 0, 0], gate)
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


@pytest.mark.parametrize("block", [MBConv, FusedMBConv])
@pytest.mark.parametrize("cin, cout, stride, skip", [(8, 8, 1, True), (8, 8, 2, False), (8, 16, 1, False)])
def test_residual_on_off_and_identity_at_init(block, cin, cout, stride, skip):
    torch.manual_seed(0)
    m = block(cin, cout, stride=stride, se_ratio=0.25).eval()
    assert m.has_skip == skip
    x = torch.randn(2, cin, 8, 8)
    out = m(x)
    assert out.shape == (2, cout, 8 // stride, 8 // stride)
    last = m.project.norm
    if skip:
        assert torch.equal(last.weight, torch.zeros_like(last.weight))
        assert torch.equal(out, x)   # zero gamma: the block starts as the identity
    else:
        assert torch.equal(last.weight, torch.ones_like(last.weight))  # no skip: no zero-init
        assert out.abs().sum() > 0
    randomize_norms(m)
    branch = m.project(m.se(m.dw(m.expand(x)))) if block is MBConv else m.project(m.se(m.expand(x)))
    assert branch.abs().sum() > 0
    torch.testing.assert_close(m(x), x + branch if skip else branch)
    if not skip:
        assert isinstance(m.drop_path, nn.Identity)


def test_mbconv_structure():
    m = MBConv(16, 24, stride=2, expand_ratio=6, se_ratio=0.25)
    assert m.expand.conv.out_channels == 96 and m.expand.conv.kernel_size == (1, 1)
    assert m.dw.conv.groups == 96 and m.dw.conv.stride == (2, 2) and m.dw.conv.kernel_size == (3, 3)
    assert m.se.reduce.out_channels == 4       # from the block input: round(16 * 0.25), not 96 / 4
    assert m.project.conv.out_channels == 24 and isinstance(m.project.act, nn.Identity)
    assert isinstance(m.expand.act, nn.SiLU) and isinstance(m.dw.act, nn.SiLU)
    dw_only = MBConv(16, 16, expand_ratio=1, se_ratio=0)
    assert isinstance(dw_only.expand, nn.Identity) and isinstance(dw_only.se, nn.Identity)
    assert dw_only.dw.conv.groups == 16
    gn = MBConv(16, 16, norm=partial(nn.GroupNorm, 4))
    assert isinstance(gn.dw.norm, nn.GroupNorm)


def test_fused_mbconv_structure():
    m = FusedMBConv(16, 32, stride=2, expand_ratio=4)
    assert m.expand.conv.kernel_size == (3, 3) and m.expand.conv.stride == (2, 2)
    assert m.expand.conv.out_channels == 64 and m.project.conv.kernel_size == (1, 1)
    assert isinstance(m.se, nn.Identity)       # EfficientNetV2 uses no SE in fused blocks
    assert FusedMBConv(16, 32, se_ratio=0.25).se.reduce.out_channels == 4
    single = FusedMBConv(24, 24, expand_ratio=1)
    assert isinstance(single.project, nn.Identity)
    assert single.expand.conv.out_channels == 24 and isinstance(single.expand.act, nn.SiLU)
    assert sum(isinstance(mod, nn.Conv2d) for mod in single.modules()) == 1


def test_drop_path_only_on_the_residual_in_training():
    torch.manual_seed(0)
    m = MBConv(8, 8, drop_path=0.5)
    randomize_norms(m)
    x = torch.randn(16, 8, 4, 4)
    with torch.no_grad():
        assert not torch.equal(m.eval()(x), x)
        torch.manual_seed(1)
        tr = m.train()(x)
    # per sample: either the input alone (dropped branch) or input + branch / keep-prob
    dropped = [torch.equal(tr[i], x[i]) for i in range(16)]
    assert 0 < sum(dropped) < 16


def _copy_by_order(src: nn.Module, dst: nn.Module) -> None:
    """Copy a state dict entry by entry in registration order (same layer order, other names)."""
    s, d = src.state_dict(), dst.state_dict()
    assert len(s) == len(d)
    for (ks, vs), (kd, vd) in zip(s.items(), d.items()):
        assert vs.shape == vd.shape, (ks, kd)
    dst.load_state_dict(dict(zip(d.keys(), s.values())))


@pytest.mark.parametrize("kind", ["mbconv", "fused", "fused_e1"])
def test_blocks_match_timm_efficientnet_blocks(kind):
    from timm.models._efficientnet_blocks import ConvBnAct, EdgeResidual, InvertedResidual
    from timm.models._efficientnet_blocks import SqueezeExcite as TimmSE
    torch.manual_seed(0)
    if kind == "mbconv":  # timm sizes SE from the expanded width with rd_ratio / exp_ratio
        ref = InvertedResidual(16, 16, 3, exp_ratio=4, act_layer=nn.SiLU,
                               se_layer=partial(TimmSE, rd_ratio=0.25 / 4))
        ours = MBConv(16, 16, expand_ratio=4, se_ratio=0.25)
    elif kind == "fused":
        ref = EdgeResidual(16, 16, 3, exp_ratio=4, act_layer=nn.SiLU)
        ours = FusedMBConv(16, 16, expand_ratio=4)
    else:
        ref = ConvBnAct(16, 16, 3, skip=True, act_layer=nn.SiLU)
        ours = FusedMBConv(16, 16, expand_ratio=1)
    randomize_norms(ref)
    _copy_by_order(ref, ours)
    ref.eval(), ours.eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
