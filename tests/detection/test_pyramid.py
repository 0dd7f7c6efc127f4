"""Feature pyramids for detection: ViTDet's windowed ViT and its weights, the simple pyramid
against a hand computation, FPN levels of every backbone family, a torchvision Faster R-CNN
train step, and layer ids for layer-wise lr decay."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

import keel
from keel.detection.pyramid import (HierarchicalFPN, SimpleFeaturePyramid, build_pyramid, default_global_blocks,
                                    layer_id, load_vitdet_weights, vitdet_vit)
from keel.engine.optim import layer_ids


def vit(name: str = "vit_tiny_patch16", **kw) -> nn.Module:
    torch.manual_seed(0)
    return keel.create_model(name, **kw)


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial values everywhere (tokens and relative-position tables start at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# ---------------------------------------------------------------- ViTDet backbone
@pytest.mark.parametrize("depth, expected", [(12, (2, 5, 8, 11)), (24, (5, 11, 17, 23)), (32, (7, 15, 23, 31))])
def test_default_global_blocks_are_vitdets(depth, expected):
    # ViTDet: B (12 blocks) 2/5/8/11, L (24) 5/11/17/23, H (32) 7/15/23/31
    assert default_global_blocks(depth) == expected


def test_vitdet_vit_config_and_window_layout():
    m = vitdet_vit(vit(), window_size=14)
    assert (m.cfg.class_token, m.cfg.distilled, m.cfg.global_pool) == (False, False, "avg")
    assert m.cfg.drop_path_rate == 0.1 and m.cfg.img_size == 224 and m.cls_token is None
    assert [b.window for b in m.blocks] == [0 if i in (2, 5, 8, 11) else 14 for i in range(12)]
    assert m.blocks[-1].drop_path.p == pytest.approx(0.1)


@pytest.mark.parametrize("hw", [(64, 64), (64, 48)])
def test_window_covering_the_grid_equals_global_attention(hw):
    # a 4x4 window over a 4x4 (or 4x3, padded and masked) patch grid is global attention
    src = randomize(vit(depth=3))
    win = vitdet_vit(src, window_size=4, global_blocks=(), drop_path_rate=0.0).eval()
    ref = keel.create_model("vit_tiny_patch16", depth=3, class_token=False, global_pool="avg").eval()
    ref.load_state_dict(win.state_dict())
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out, expect = win.feature_maps(x)[0], ref.feature_maps(x)[0]
        smaller = vitdet_vit(src, window_size=2, global_blocks=(), drop_path_rate=0.0).eval().feature_maps(x)[0]
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)
    assert (smaller - expect).abs().max() > 1e-3   # real windows do change the output


def test_window_covering_the_grid_equals_global_attention_with_rel_pos():
    src = randomize(vit(depth=2, img_size=64, rel_pos=True))
    win = vitdet_vit(src, window_size=4, global_blocks=(1,), drop_path_rate=0.0).eval()
    assert win.blocks[0].window == 4 and win.blocks[1].window == 0
    ref = keel.create_model("vit_tiny_patch16", depth=2, img_size=64, rel_pos=True, class_token=False,
                            global_pool="avg").eval()
    ref.load_state_dict(win.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(win.feature_maps(x)[0], ref.feature_maps(x)[0], atol=1e-5, rtol=0)


def test_converted_weights_equal_the_source_but_the_tokens():
    src = randomize(vit("deit_tiny_distilled_patch16", depth=2, num_classes=5))
    sd, out = src.state_dict(), vitdet_vit(src).state_dict()
    dropped = {"cls_token", "dist_token", "head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert set(out) == set(sd) - dropped
    torch.testing.assert_close(out["pos_embed"], sd["pos_embed"][:, 2:], atol=0, rtol=0)
    for k in set(out) - {"pos_embed"}:
        torch.testing.assert_close(out[k], sd[k], atol=0, rtol=0)


def mae_style_state_dict(dim: int = 192) -> dict[str, torch.Tensor]:
    """A ViT with class token plus what MAE's pretraining checkpoint carries besides the encoder."""
    sd = randomize(vit(depth=2)).state_dict()
    sd.update({"mask_token": torch.randn(1, 1, 128), "decoder_embed.weight": torch.randn(128, dim),
               "decoder_pos_embed": torch.randn(1, 197, 128), "decoder_blocks.0.norm1.weight": torch.randn(128),
               "decoder_norm.weight": torch.randn(128), "decoder_pred.weight": torch.randn(768, 128)})
    return sd


def test_mae_style_state_dict_loads_and_resamples_positions():
    sd = mae_style_state_dict()
    model = vitdet_vit(vit(depth=2))
    load_vitdet_weights(model, sd)
    out = model.state_dict()
    torch.testing.assert_close(out["pos_embed"], sd["pos_embed"][:, 1:], atol=0, rtol=0)
    torch.testing.assert_close(out["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"], atol=0, rtol=0)
    # built for 128 px: the 14x14 table is resampled once, bicubic, to 8x8
    small = vitdet_vit(vit(depth=2), img_size=128)
    load_vitdet_weights(small, sd)
    grid = sd["pos_embed"][:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, -1)
    torch.testing.assert_close(small.state_dict()["pos_embed"], expect, atol=1e-6, rtol=0)


def test_relative_position_tables_are_resampled_to_the_window():
    src = vit(depth=2, img_size=64, rel_pos=True)   # tables for the 4x4 grid: 7x7 offsets
    with torch.no_grad():
        for blk in src.blocks:
            blk.rel_pos.relative_position_bias_table.fill_(0.25)
    win = vitdet_vit(src, window_size=2, global_blocks=(1,))
    table = win.blocks[0].rel_pos.relative_position_bias_table   # 3x3 offsets for a 2x2 window
    assert table.shape == (9, 3)
    torch.testing.assert_close(table, torch.full((9, 3), 0.25), atol=1e-6, rtol=0)  # bicubic keeps a constant


def decomposed_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith(("attn.rel_pos_h", "attn.rel_pos_w"))}


def test_vitdet_vit_adds_zero_decomposed_relative_positions_on_request():
    # a 4x3 grid in 2x2 windows (padded) with one global block: zero tables change nothing
    src = randomize(vit(depth=3, img_size=64))
    plain = vitdet_vit(src, window_size=2, global_blocks=(2,), drop_path_rate=0.0).eval()
    rel = vitdet_vit(src, window_size=2, global_blocks=(2,), drop_path_rate=0.0, rel_pos_decomposed=True).eval()
    assert not decomposed_tables(plain) and rel.cfg.rel_pos_decomposed
    tables = decomposed_tables(rel)
    # (2 * window - 1, head_dim) in windowed blocks, (2 * grid - 1, head_dim) in the global one
    assert {k: tuple(v.shape) for k, v in tables.items()} == {
        **{f"blocks.{i}.attn.rel_pos_{a}": (3, 64) for i in (0, 1) for a in "hw"},
        **{f"blocks.2.attn.rel_pos_{a}": (7, 64) for a in "hw"}}
    assert all(not v.any() for v in tables.values())
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(rel.feature_maps(x)[0], plain.feature_maps(x)[0], atol=1e-6, rtol=0)
    # build_pyramid passes the option on; off by default
    assert decomposed_tables(build_pyramid(src, window_size=2, rel_pos_decomposed=True).backbone)
    assert not decomposed_tables(build_pyramid(src, window_size=2).backbone)


def test_decomposed_tables_load_resampled_or_stay_zero():
    src = randomize(vit(depth=2, img_size=64, rel_pos_decomposed=True))   # 7-row tables: the 4x4 grid
    sd = src.state_dict()
    # a source with them keeps them (without being asked): the global block's as they are, the
    # 2x2 windows' resampled linearly to 3 rows, as ViTDet's get_rel_pos
    win = vitdet_vit(src, window_size=2, global_blocks=(1,))
    out = win.state_dict()
    torch.testing.assert_close(out["blocks.1.attn.rel_pos_w"], sd["blocks.1.attn.rel_pos_w"], atol=0, rtol=0)
    table = sd["blocks.0.attn.rel_pos_h"]
    expect = F.interpolate(table.T[None], size=3, mode="linear", align_corners=False)[0].T
    torch.testing.assert_close(out["blocks.0.attn.rel_pos_h"], expect, atol=1e-6, rtol=0)
    # a source without them: they stay zero, everything else loads
    plain_sd = {k: v for k, v in sd.items() if "rel_pos_" not in k}
    load_vitdet_weights(win, plain_sd)
    assert all(not v.any() for v in decomposed_tables(win).values())
    torch.testing.assert_close(win.state_dict()["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    # a model without them refuses a source's tables instead of dropping them
    with pytest.raises(ValueError, match="unexpected.*rel_pos_h"):
        load_vitdet_weights(vitdet_vit(vit(depth=2, img_size=64), window_size=2), sd)


def test_bad_state_dicts_and_arguments_raise_one_line():
    model = vitdet_vit(vit(depth=2))
    sd = vit(depth=2).state_dict()
    with pytest.raises(ValueError, match=r"unexpected \['fc_norm.weight'\]"):
        load_vitdet_weights(model, {**sd, "fc_norm.weight": torch.ones(192)})
    with pytest.raises(ValueError, match="not a square grid"):
        load_vitdet_weights(model, {**sd, "pos_embed": sd["pos_embed"][:, :-3]})
    with pytest.raises(ValueError, match="window_size must be > 0"):
        vitdet_vit(vit(depth=2), window_size=0)
    with pytest.raises(ValueError, match="keel VisionTransformer"):
        vitdet_vit(keel.create_model("resnet10_cifar"))


# ---------------------------------------------------------------- simple pyramid by hand
class PatchMap(nn.Module):
    """A stand-in plain backbone: one stride-16 map from a patchify conv."""

    def __init__(self, dim: int = 8, stride: int = 16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, stride, stride)
        self.feature_info = [{"stride": stride, "channels": dim}]

    def feature_maps(self, x):
        return [self.proj(x)]


def ln(x, norm):
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)


def up2(x, conv):
    """2x2 stride-2 transposed conv: input pixel (h, w) paints output block (2h.., 2w..)."""
    B, _, H, W = x.shape
    y = torch.einsum("bchw,coij->bohiwj", x, conv.weight).reshape(B, -1, 2 * H, 2 * W)
    return y + conv.bias.view(1, -1, 1, 1)


def project(x, level):
    (c1, n1), (c3, n3) = level[1], level[2]
    x = ln(torch.einsum("bchw,oc->bohw", x, c1.weight[:, :, 0, 0]), n1)
    return ln(F.conv2d(x, c3.weight, padding=1), n3)


def test_simple_pyramid_matches_a_hand_computation():
    pyr = randomize(SimpleFeaturePyramid(PatchMap(), out_channels=6)).eval()
    x = torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        out = pyr(x)
        f = pyr.backbone.feature_maps(x)[0]                                   # (2, 8, 8, 12)
        up4 = pyr.levels[0][0]
        s4 = up2(F.gelu(ln(up2(f, up4[0]), up4[1])), up4[3])
        s2 = up2(f, pyr.levels[1][0])
        half = f.reshape(2, 8, 4, 2, 6, 2).amax((3, 5))
        expect = [project(s4, pyr.levels[0]), project(s2, pyr.levels[1]), project(f, pyr.levels[2]),
                  project(half, pyr.levels[3])]
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for k, e in enumerate(expect):
        torch.testing.assert_close(out[str(k)], e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pool"], out["3"][..., ::2, ::2], atol=0, rtol=0)
    assert pyr.strides == [4, 8, 16, 32, 64] and pyr.size_divisible == 64 and pyr.out_channels == 6
    assert pyr.levels[2][1][0].bias is None and pyr.levels[2][2][0].bias is None   # ViTDet: no conv bias


def test_pyramids_reject_sizes_that_would_misplace_anchors():
    pyr = SimpleFeaturePyramid(PatchMap())
    with pytest.raises(ValueError, match="96x128 is not a multiple of size_divisible=64"):
        pyr(torch.randn(1, 3, 96, 128))
    with pytest.raises(ValueError, match="scale_factors"):
        SimpleFeaturePyramid(PatchMap(), scale_factors=(3.0,))


# ---------------------------------------------------------------- every family
FAMILIES = ["vit_tiny_patch16", "vit_tiny_patch4_32", "keel_tiny", "swin_tiny", "cswin_tiny",
            "resnetv2_14_tiny_cifar", "resnet10_cifar", "resnet18"]


@pytest.mark.parametrize("name", FAMILIES)
def test_pyramid_levels_are_input_over_stride_and_train_the_backbone(name):
    backbone = vit(name, depth=2) if name.startswith("vit") else vit(name)
    pyr = build_pyramid(backbone, out_channels=32)
    plain = name.startswith("vit")
    assert isinstance(pyr, SimpleFeaturePyramid if plain else HierarchicalFPN)
    info = backbone.feature_info
    if plain:
        s = info[-1]["stride"]
        expect = [s // 4, s // 2, s, 2 * s, 4 * s]
    else:
        expect = [f["stride"] for f in info if f["stride"] >= 4][-4:]
        expect.append(2 * expect[-1])
    assert pyr.strides == expect and pyr.size_divisible == math.lcm(*expect)
    H, W = 2 * pyr.size_divisible, 3 * pyr.size_divisible
    out = pyr(torch.randn(1, 3, H, W))
    assert list(out) == pyr.featmap_names + ["pool"] and len(out) == len(expect)
    for t, s in zip(out.values(), pyr.strides):
        assert t.shape == (1, 32, H // s, W // s)
    sum(t.square().mean() for t in out.values()).backward()
    first = next(p for p in pyr.backbone.parameters() if p.requires_grad)   # the stem / patch embedding
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_build_pyramid_choices_and_errors():
    windowed = vitdet_vit(vit(depth=2), window_size=7)
    assert build_pyramid(windowed).backbone is windowed                  # already ViTDet's: kept
    plain = vit(depth=2)
    assert build_pyramid(plain, to_vitdet=False).backbone is plain
    converted = build_pyramid(plain, window_size=7, global_blocks=(1,)).backbone
    assert converted.cfg.window_size == 7 and [b.window for b in converted.blocks] == [7, 0]
    with pytest.raises(ValueError, match="build_pyramid: Linear is not a keel backbone"):
        build_pyramid(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="build_pyramid: backbone must be"):
        build_pyramid("vit_tiny_patch16")
    with pytest.raises(ValueError, match="no feature map of stride >= 64"):
        HierarchicalFPN(keel.create_model("resnet10_cifar"), min_stride=64)


# ---------------------------------------------------------------- torchvision detector
def test_faster_rcnn_trains_on_the_simple_pyramid():
    pyr = SimpleFeaturePyramid(vitdet_vit(vit(depth=2), window_size=4), out_channels=32)
    anchors = AnchorGenerator(tuple((8 * s,) for s in pyr.strides), ((0.5, 1.0, 2.0),) * 5)
    model = FasterRCNN(pyr, num_classes=3, rpn_anchor_generator=anchors,
                       box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), min_size=128, max_size=128,
                       size_divisible=pyr.size_divisible, rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    torch.manual_seed(0)
    images = [torch.rand(3, 128, 100), torch.rand(3, 90, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 40.0, 120.0, 85.0]]),
                "labels": torch.tensor([2, 1])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert pyr.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    # the batch is padded to 128x128, so each level's anchor stride (batch // map) is the true one
    batch, _ = model.transform(images, targets)
    with torch.no_grad():
        feats = pyr(batch.tensors)
    assert [batch.tensors.shape[-1] // f.shape[-1] for f in feats.values()] == pyr.strides
    # the detector's own parameter names get ViTDet's layer ids
    ids = {n: layer_id(n, 2) for n, _ in model.named_parameters()}
    assert ids["backbone.backbone.blocks.1.mlp.fc2.weight"] == 2 and ids["backbone.backbone.pos_embed"] == 0
    assert ids["rpn.head.conv.0.0.weight"] == 3 and ids["roi_heads.box_predictor.cls_score.weight"] == 3


# ---------------------------------------------------------------- layer ids
def test_layer_id_agrees_with_keel_optim_and_vitdet():
    pyr = SimpleFeaturePyramid(vitdet_vit(vit(depth=3)), out_channels=16)
    expect = layer_ids(pyr)   # keel.engine.optim's numbering of a wrapper holding ``backbone``
    assert {n: layer_id(n, 3) for n in expect} == expect
    assert {n: layer_id("backbone." + n, 3) for n in expect} == expect   # as named inside a detector
    assert layer_id("module.backbone.backbone.blocks.0.norm1.weight", 3) == 1
    assert layer_id("backbone.backbone.patch_embed.proj.weight", 3) == 0
    assert layer_id("backbone.backbone.norm.weight", 3) == 4 and layer_id("backbone.levels.0.0.0.weight", 3) == 4
    with pytest.raises(ValueError, match="multi-stage backbone"):
        layer_id("backbone.backbone.stages.0.blocks.0.conv.weight", 4)
