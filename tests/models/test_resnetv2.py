"""BiT ResNet-v2: registry, parameter counts, feature maps, pre-activation layout, drop-path,
and timm equivalence (logits, pooled features, stage maps) with a lossless key round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import keel
import keel.models.resnetv2  # noqa: F401  (registers the builders)
from keel.convert import from_timm, to_timm
from keel.models.layers.conv import StdConv2d
from keel.models.resnetv2 import GroupNormReLU, ResNetV2, ResNetV2Config

timm = pytest.importorskip("timm")

BIT = ["resnetv2_101x1_bit", "resnetv2_101x3_bit", "resnetv2_152x2_bit", "resnetv2_152x4_bit",
       "resnetv2_50x1_bit", "resnetv2_50x3_bit"]
# a narrow, shallow ResNet-v2 (GroupNorm with 4 groups) for structural tests
TINY = dict(depths=(1, 1, 1, 1), stem_width=8, widths=(16, 32, 32, 64), gn_groups=4)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_matches_timms_bit_models():
    assert keel.list_models("resnetv2") == sorted(BIT + ["resnetv2_14_tiny_cifar", "resnetv2_26x1_cifar"])
    assert sorted(timm.list_models("resnetv2_*_bit")) == BIT   # the same six sizes as timm
    m = keel.create_model("resnetv2_26x1_cifar", **TINY)
    assert isinstance(m, ResNetV2) and isinstance(m.head, nn.Identity)
    assert m.cfg == ResNetV2Config(stem="cifar", img_size=32, **TINY)
    with pytest.raises(ValueError, match="unknown stem"):
        keel.create_model("resnetv2_26x1_cifar", stem="deep", **TINY)


def test_tiny_cpu_size_is_one_quarter_width_bottleneck_per_stage():
    m = keel.create_model("resnetv2_14_tiny_cifar")
    assert m.cfg == ResNetV2Config(depths=(1, 1, 1, 1), stem="cifar", stem_width=16, widths=(64, 128, 256, 512),
                                   gn_groups=8, img_size=32)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 1 + 4 * 3 + 4 and all(isinstance(c, StdConv2d) for c in convs)   # 14 layers + 4 shortcuts
    # stem 3x3 (3->16) + per stage: GN(cin) + 1x1 cin->mid + GN + 3x3 mid->mid + GN + 1x1 mid->cout + 1x1 shortcut
    # (convs without bias), + the final GN(512)
    expect, cin = 3 * 16 * 9, 16
    for cout in (64, 128, 256, 512):
        mid = cout // 4
        expect += 2 * cin + cin * mid + 2 * mid + mid * mid * 9 + 2 * mid + mid * cout + cin * cout
        cin = cout
    assert n_params(m) == expect + 2 * 512


@pytest.mark.parametrize("name", BIT)
def test_parameter_counts_equal_timm(name):
    with torch.device("meta"):
        ours = n_params(keel.create_model(name, num_classes=1000))
        ref = n_params(timm.create_model(name, num_classes=1000))
    assert ours == ref
    paper = {"resnetv2_50x1_bit": 25.55e6, "resnetv2_101x3_bit": 387.9e6, "resnetv2_152x4_bit": 936.5e6}
    if name in paper:
        assert ours == pytest.approx(paper[name], rel=1e-2)


def test_every_conv_is_weight_standardized_and_every_norm_is_groupnorm():
    with torch.device("meta"):
        m = keel.create_model("resnetv2_50x3_bit")
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 1 + 16 * 3 + 4 and all(isinstance(c, StdConv2d) and c.eps == 1e-8 for c in convs)
    norms = [mod for mod in m.modules() if isinstance(mod, nn.GroupNorm)]
    assert len(norms) == 16 * 3 + 1 and all(isinstance(n, GroupNormReLU) and n.num_groups == 32 for n in norms)
    assert m.stem.conv.out_channels == 192 and m.num_features == 6144  # width factor 3 everywhere
    assert m.stem.conv.kernel_size == (7, 7) and m.stem.conv.stride == (2, 2)


@pytest.mark.parametrize("name, size, strides", [
    ("resnetv2_50x1_bit", 64, [4, 8, 16, 32]),
    ("resnetv2_26x1_cifar", 16, [1, 2, 4, 8]),
])
def test_feature_maps_match_feature_info(name, size, strides, feature_maps_match_info):
    torch.manual_seed(0)
    m = keel.create_model(name, **TINY).eval()
    assert [f["stride"] for f in m.feature_info] == strides
    assert [f["channels"] for f in m.feature_info] == [16, 32, 32, 64]
    h, w = size, size * 3 // 2
    x = torch.randn(2, 3, h, w)
    maps = feature_maps_match_info(m, x)
    with torch.no_grad():
        emb = m.embed(x)
    # pre-activation: stage outputs are raw residual sums; only the last one gets norm + ReLU
    assert all((fm < 0).any() for fm in maps[:-1]) and (maps[-1] >= 0).all()
    assert emb.shape == (2, m.num_features) and m.num_features == 64
    torch.testing.assert_close(emb, maps[-1].mean((2, 3)))
    assert all(fm.is_contiguous() for fm in maps)   # NCHW out, whatever the layout inside


def test_embed_forward_head_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    m = keel.create_model("resnetv2_50x1_bit", **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.embed(x))   # head-less: forward is embed
    c = keel.create_model("resnetv2_50x1_bit", num_classes=5, **TINY).train()
    assert isinstance(c.head, nn.Linear) and c.head.weight.std() < 0.02   # timm's N(0, 0.01) head
    out = c(x)
    assert out.shape == (2, 5)
    (out * torch.randn(2, 5)).sum().backward()
    assert c.stem.conv.weight.grad is not None and c.stem.conv.weight.grad.abs().sum() > 0


def test_drop_path_only_active_in_training():
    m = keel.create_model("resnetv2_26x1_cifar", drop_path_rate=0.3, **TINY)
    rates = [blk.drop_path.p for stage in m.stages for blk in stage]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m(x), m(x))
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        b = m(x)
        assert not torch.allclose(a, b)


def _timm_bit(num_classes: int):
    """timm's resnetv2_50x1_bit with random GroupNorm affines (else they are all 1 / 0)."""
    torch.manual_seed(0)
    t = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=num_classes).eval()
    with torch.no_grad():
        for mod in t.modules():
            if isinstance(mod, nn.GroupNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
        if num_classes:
            t.head.fc.weight.normal_(0, 0.1)
            t.head.fc.bias.normal_(0, 0.1)
    return t


def test_timm_numerics_and_round_trip():
    name = "resnetv2_50x1_bit"
    t = _timm_bit(num_classes=10)
    sd = t.state_dict()
    ours_sd = from_timm(name, sd)
    assert ours_sd["head.weight"].shape == (10, 2048)   # timm's 1x1-conv head became a Linear
    m = keel.create_model(name, num_classes=10, cpu_channels_last=False).eval()
    m.load_state_dict(ours_sd, strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(m(x), t(x), rtol=1e-5, atol=1e-5)
        # keel's default CPU layout is NHWC: the same numbers as timm given an NHWC input (both
        # then run the same oneDNN kernels); NCHW and NHWC differ only by float summation order
        nhwc = keel.create_model(name, num_classes=10).eval()
        nhwc.load_state_dict(ours_sd, strict=True)
        assert nhwc.cfg.cpu_channels_last
        torch.testing.assert_close(nhwc(x), t(x.contiguous(memory_format=torch.channels_last)),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nhwc(x), t(x), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(m.embed(x), t.forward_head(t.forward_features(x), pre_logits=True),
                                   rtol=1e-5, atol=1e-5)
        ref_maps = t.forward_intermediates(x, indices=[1, 2, 3, 4], norm=True, intermediates_only=True)
        for ours, ref in zip(m.feature_maps(x), ref_maps, strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    back = to_timm(name, ours_sd)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert list(from_timm(name, to_timm(name, m.state_dict()))) == list(m.state_dict())


def test_headless_conversion():
    t = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=0)
    sd = t.state_dict()
    ours = from_timm("resnetv2_50x1_bit", sd)
    assert not any(k.startswith("head") for k in ours)
    keel.create_model("resnetv2_50x1_bit").load_state_dict(ours, strict=True)
    assert to_timm("resnetv2_50x1_bit", ours).keys() == sd.keys()
