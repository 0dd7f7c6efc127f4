"""Swin Transformer: registry, sizes, feature maps at 224 / small-map / padded sizes, timm parity."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import keel
import keel.models.swin  # noqa: F401  (registers the builders)
from keel.convert import from_timm, to_timm
from keel.models.layers.window_attention import SwinBlock
from keel.models.swin import SwinConfig, SwinTransformer

SWINS = ["swin_base", "swin_small", "swin_tiny"]


def slim(**kw):
    """Swin-T's layout at a fraction of the width: cheap at 160-256 px."""
    args = dict(embed_dim=16, num_heads=(1, 2, 2, 4))
    args.update(kw)
    return keel.create_model("swin_tiny", **args)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_and_config():
    assert set(SWINS) <= set(keel.list_models("swin"))
    m = keel.create_model("swin_tiny", depths=(1, 1, 1, 1), embed_dim=8, num_heads=(1, 1, 1, 1))
    assert isinstance(m, SwinTransformer) and isinstance(m.head, nn.Identity)
    assert m.cfg == SwinConfig(depths=(1, 1, 1, 1), embed_dim=8, num_heads=(1, 1, 1, 1))
    assert m.num_features == 64
    with pytest.raises(TypeError):
        keel.create_model("swin_tiny", no_such_field=1)


@pytest.mark.parametrize("name, paper, timm_count", [
    ("swin_tiny", 28.3e6, 28_288_354),
    ("swin_small", 49.6e6, 49_606_258),
    ("swin_base", 87.8e6, 87_768_224),
])
def test_parameter_count(name, paper, timm_count):
    with torch.device("meta"):
        m = keel.create_model(name, num_classes=1000)
    assert n_params(m) == pytest.approx(paper, rel=0.01)
    assert n_params(m) == timm_count  # timm's swin_*_patch4_window7_224, to the parameter


def test_layout_shifts_and_drop_path_rates():
    with torch.device("meta"):
        m = keel.create_model("swin_tiny", drop_path_rate=0.2)
    blocks = [b for s in m.stages for b in s.blocks]
    assert len(blocks) == 12
    assert [b.shift for b in m.stages[2].blocks] == [(0, 0), (3, 3)] * 3   # every other block shifts
    assert all(b.window == (7, 7) for b in blocks)
    assert [b.drop_path.p for b in blocks] == pytest.approx(torch.linspace(0, 0.2, 12).tolist())
    assert isinstance(m.stages[0].downsample, nn.Identity)
    assert m.stages[1].downsample.reduction.weight.shape == (192, 384)
    assert m.feature_info == [{"stride": 4, "channels": 96}, {"stride": 8, "channels": 192},
                              {"stride": 16, "channels": 384}, {"stride": 32, "channels": 768}]


@pytest.mark.parametrize("size", [224, 160, 256, (160, 224)])
def test_feature_maps_match_feature_info(size):
    # 224: maps 56/28/14/7, all multiples of the window. 160: the last map is 5x5, smaller than
    # the window, so it is one window without shift. 256: 64/32/16/8 need padding to 70/35/21/14.
    h, w = (size, size) if isinstance(size, int) else size
    torch.manual_seed(0)
    m = slim(num_classes=3).eval()
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        maps = m.feature_maps(x)
        emb = m.embed(x)
        logits = m(x)
    assert len(maps) == len(m.feature_info) == 4
    for fm, info in zip(maps, m.feature_info):
        assert fm.shape == (1, info["channels"], h // info["stride"], w // info["stride"])
    # the last map is the normalized one that embed pools; the others are raw stage outputs
    torch.testing.assert_close(emb, maps[-1].mean((2, 3)))
    torch.testing.assert_close(logits, m.head(emb))
    assert torch.isfinite(emb).all()


def test_input_not_a_multiple_of_the_patch_raises():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        slim()(torch.randn(1, 3, 66, 64))


def test_conv_qkv_and_layer_scale_variants_build_and_train():
    torch.manual_seed(0)
    m = slim(depths=(1, 1, 2, 1), conv_qkv=True, layer_scale=1e-5, drop_path_rate=0.1)
    blk = m.stages[2].blocks[1]
    assert isinstance(blk, SwinBlock) and blk.dwconv.groups == blk.dwconv.in_channels
    assert torch.equal(blk.gamma1, torch.full_like(blk.gamma1, 1e-5))
    names = set(m.state_dict())
    assert "stages.2.blocks.1.dwconv.weight" in names and "stages.2.blocks.1.gamma2" in names
    with pytest.raises(ValueError, match="no place"):
        to_timm("swin_tiny", m.state_dict())
    (m(torch.randn(2, 3, 64, 64)) * torch.randn(2, m.num_features)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    plain = slim(depths=(1, 1, 2, 1), rel_pos=False)
    assert not any("relative_position" in k for k in plain.state_dict())


def _spread(model: nn.Module) -> None:
    """Push random-init weights away from their init (LayerNorm 1/0, tiny bias tables) so that
    a mapping or ordering mistake changes the logits by far more than the tolerance."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "relative_position_bias_table" in name else 0.3 if p.ndim == 1 else 0.02
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_timm_equivalence_swin_tiny():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10).eval()
    _spread(ref)
    sd = ref.state_dict()
    m = keel.create_model("swin_tiny", num_classes=10).eval()
    converted = from_timm("swin_tiny", sd)
    m.load_state_dict(converted, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = ref(x)
        got = m(x)
        maps = m.feature_maps(x)
        timm_maps = ref.forward_intermediates(x, norm=True, intermediates_only=True)
    assert want.std() > 0.1  # the logits carry signal a mistake would change
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(maps, timm_maps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    back = to_timm("swin_tiny", converted)
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_timm_official_layout_converts_too():
    """The Microsoft checkpoints (and timm < 0.9) end each stage with the merging that timm now
    opens the next stage with, and name the classifier ``head``."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        sd = timm.create_model("swin_tiny_patch4_window7_224", num_classes=5).state_dict()
    official = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda g: f"layers.{int(g.group(1)) - 1}.downsample", k)
        official[k.replace("head.fc.", "head.")] = v
    official["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49, device="meta")
    official["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, device="meta")
    assert "layers.0.downsample.reduction.weight" in official
    a, b = from_timm("swin_tiny", sd), from_timm("swin_tiny", official)
    assert a.keys() == b.keys()
    assert all(a[k] is b[k] for k in a)
    with torch.device("meta"):
        m = keel.create_model("swin_tiny", num_classes=5)
    assert set(m.state_dict()) == set(a)
