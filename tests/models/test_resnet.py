"""The ResNets: registry, feature maps against feature_info, embed, drop-path, size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import keel
from keel.models.resnet import ResNet, ResNetConfig

RESNETS = ["resnet10_cifar", "resnet18", "resnet18_cifar"]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny(**kw):
    """resnet10_cifar at a quarter of its width: 4 stages of one block, fast on a CPU."""
    return keel.create_model("resnet10_cifar", widths=(8, 16, 16, 32), **kw)


def test_registry_lists_and_builds_resnets():
    assert [n for n in keel.list_models("resnet") if not n.startswith("resnetv2")] == RESNETS
    for name in RESNETS:
        with torch.device("meta"):
            m = keel.create_model(name)
        assert isinstance(m, ResNet) and isinstance(m.head, nn.Identity)
        assert m.cfg.stem == ("imagenet" if name == "resnet18" else "cifar")
    assert tiny().cfg == ResNetConfig(depths=(1, 1, 1, 1), widths=(8, 16, 16, 32))
    with pytest.raises(ValueError, match="did you mean resnet18"):
        keel.create_model("resnet19")
    with pytest.raises(ValueError, match="unknown stem"):
        keel.create_model("resnet10_cifar", stem="vgg")


def test_parameter_counts():
    with torch.device("meta"):
        r18c = keel.create_model("resnet18_cifar")
        r18c10 = keel.create_model("resnet18_cifar", num_classes=10)
        r18 = keel.create_model("resnet18", num_classes=1000)
    assert n_params(r18c) == pytest.approx(11.17e6, rel=1e-3)
    assert n_params(r18c10) == pytest.approx(11.17e6, rel=1e-3)   # the usual "11.17M" CIFAR figure
    # the ImageNet ResNet-18 has exactly torchvision's layers (11,689,512 parameters)
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ref = torchvision.models.resnet18(num_classes=1000)
    assert n_params(r18) == n_params(ref) == 11_689_512
    assert sorted(p.shape for p in r18.state_dict().values()) == sorted(p.shape for p in ref.state_dict().values())


@pytest.mark.parametrize("name, kw, size, strides", [
    ("resnet10_cifar", dict(widths=(8, 16, 16, 32)), 32, [1, 2, 4, 8]),
    ("resnet18", dict(widths=(8, 16, 16, 32), depths=(1, 1, 1, 1)), 64, [4, 8, 16, 32]),
])
def test_feature_maps_match_feature_info(name, kw, size, strides, feature_maps_match_info):
    torch.manual_seed(0)
    m = keel.create_model(name, **kw).eval()
    assert [f["stride"] for f in m.feature_info] == strides
    assert [f["channels"] for f in m.feature_info] == list(kw["widths"])
    h, w = size, size * 3 // 2  # both multiples of the last stride
    x = torch.randn(2, 3, h, w)
    maps = feature_maps_match_info(m, x)
    with torch.no_grad():
        emb = m.embed(x)
    assert emb.shape == (2, m.num_features) and m.num_features == m.feature_info[-1]["channels"]
    torch.testing.assert_close(emb, maps[-1].mean((2, 3)))  # embed = global average of the last map


def test_embed_forward_and_head():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    m = tiny().eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.embed(x))  # head-less: forward is embed
    c = tiny(num_classes=7).eval()
    with torch.no_grad():
        out = c(x)
        assert out.shape == (3, 7)
        torch.testing.assert_close(out, c.head(c.embed(x)))
    # any input size works (odd sizes round up at each stride-2 stage)
    with torch.no_grad():
        assert m.embed(torch.randn(1, 3, 11, 20)).shape == (1, 32)


def test_residual_branches_start_at_zero():
    m = tiny()
    for stage in m.stages:
        for blk in stage:
            assert torch.equal(blk.bn2.weight, torch.zeros_like(blk.bn2.weight))
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert convs and all(c.weight.std() > 0 for c in convs)


def test_drop_path_only_active_in_training(drop_path_only_in_training):
    torch.manual_seed(0)
    m = tiny(drop_path_rate=0.3)
    rates = [blk.drop_path.p for stage in m.stages for blk in stage]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])  # linear in depth
    with torch.no_grad():  # undo the zero-init, else every residual branch is 0 and dropping it is a no-op
        for stage in m.stages:
            for blk in stage:
                blk.bn2.weight.fill_(1.0)
    plain = tiny()
    plain.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 16, 16)
    drop_path_only_in_training(m, plain, x)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), plain(x))  # no drop-path: deterministic in train too


def test_gradients_reach_the_stem():
    torch.manual_seed(0)
    m = tiny().train()
    (m(torch.randn(4, 3, 16, 16)) * torch.randn(4, 32)).sum().backward()
    stem_conv = m.stem[0]
    assert stem_conv.weight.grad is not None and stem_conv.weight.grad.abs().sum() > 0


def test_cpu_channels_last_changes_the_layout_not_the_numbers():
    torch.manual_seed(0)
    nhwc = keel.create_model("resnet10_cifar", widths=(8, 16, 16, 32)).train()
    nchw = keel.create_model("resnet10_cifar", widths=(8, 16, 16, 32), cpu_channels_last=False).train()
    nchw.load_state_dict(nhwc.state_dict())
    assert nhwc.cfg.cpu_channels_last and not nchw.cfg.cpu_channels_last
    x = torch.randn(4, 3, 16, 16)
    maps_l, maps_c = nhwc.feature_maps(x), nchw.feature_maps(x)
    assert maps_l[0].is_contiguous(memory_format=torch.channels_last) and maps_c[0].is_contiguous()
    for a, b in zip(maps_l, maps_c, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)       # only the summation order differs
    # gradients too (the backward is where most of the time goes)
    nhwc.embed(x).pow(2).sum().backward()
    nchw.embed(x).pow(2).sum().backward()
    for (n, a), b in zip(nhwc.named_parameters(), nchw.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)
