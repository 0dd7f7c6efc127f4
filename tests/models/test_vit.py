"""The Vision Transformer: registry, shapes, position-embedding interpolation, drop-path, size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import keel
from keel.models.layers import Attention, DropPath
from keel.models.registry import register_model
from keel.models.vit import VisionTransformer, ViTConfig

VITS = ["vit_base_patch16", "vit_small_patch16", "vit_tiny_patch16", "vit_tiny_patch4_32"]


def tiny(**kw):
    """A ViT small enough for fast tests: 16 px, patch 4 (4x4 tokens), dim 32."""
    args = dict(img_size=16, depth=2, dim=32, num_heads=2)
    args.update(kw)
    return keel.create_model("vit_tiny_patch4_32", **args)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_and_builds_vits():
    assert keel.list_models("vit") == sorted(VITS)
    assert set(VITS) <= set(keel.list_models())
    m = keel.create_model("vit_tiny_patch4_32", depth=1)
    assert isinstance(m, VisionTransformer)
    assert m.cfg == ViTConfig(img_size=32, patch_size=4, dim=192, depth=1, num_heads=3)
    assert len(m.blocks) == 1 and isinstance(m.head, nn.Identity)


def test_registry_errors():
    with pytest.raises(ValueError, match="did you mean vit_tiny_patch16"):
        keel.create_model("vit_tiny_patch61")
    with pytest.raises(ValueError, match="keel models"):
        keel.create_model("no_such_model_at_all")
    with pytest.raises(TypeError):
        keel.create_model("vit_tiny_patch4_32", no_such_field=1)

    def vit_tiny_patch16(num_classes=0, **kw):  # an already registered name
        return nn.Identity()

    with pytest.raises(ValueError, match="registered twice"):
        register_model(vit_tiny_patch16)


@pytest.mark.parametrize("name, expected", [
    # ViT-B/16 with 1000 classes: 86,566,888 here (timm's 86,567,656 includes a position for
    # the class token, which keel's ViT does not add)
    ("vit_base_patch16", 86.57e6),
    ("vit_small_patch16", 22.05e6),
    ("vit_tiny_patch16", 5.717e6),
])
def test_parameter_count(name, expected):
    with torch.device("meta"):  # counting needs no memory and no initialisation
        m = keel.create_model(name, num_classes=1000)
    assert n_params(m) == pytest.approx(expected, rel=1e-3)


def test_embed_forward_and_head_shapes():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    m = tiny().eval()
    assert m.num_features == 32
    assert m.embed(x).shape == (3, 32)
    torch.testing.assert_close(m(x), m.embed(x))  # head-less: forward is embed
    torch.manual_seed(0)
    c = tiny(num_classes=5).eval()
    assert c(x).shape == (3, 5)
    torch.testing.assert_close(c(x), c.head(c.embed(x)))
    tokens = m.forward_tokens(x)
    assert tokens.shape == (3, 1 + 16, 32)
    torch.testing.assert_close(m.embed(x), tokens[:, 0])  # class-token pooling
    a = tiny(global_pool="avg").eval()
    ta = a.forward_tokens(x)
    torch.testing.assert_close(a.embed(x), ta[:, 1:].mean(1))


@pytest.mark.parametrize("h, w", [(16, 16), (24, 24), (16, 28)])
def test_feature_maps_match_feature_info(h, w):
    m = tiny().eval()
    x = torch.randn(2, 3, h, w)
    maps = m.feature_maps(x)
    assert len(maps) == len(m.feature_info) == 1
    for fm, info in zip(maps, m.feature_info):
        assert fm.shape == (2, info["channels"], h // info["stride"], w // info["stride"])
    # the map is the patch tokens laid out on the grid, row by row
    tokens = m.forward_tokens(x)[:, 1:]
    torch.testing.assert_close(maps[0][:, :, 1, 2], tokens[:, 1 * (w // 4) + 2])


def test_input_not_a_multiple_of_the_patch_raises():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny()(torch.randn(1, 3, 18, 16))


def test_pos_embed_native_size_is_the_parameter():
    m = tiny()
    assert m.grid == 4 and m.pos_embed.shape == (1, 16, 32)
    assert m.pos_embed_for(4, 4) is m.pos_embed
    # the interpolation path, taken at the native grid, gives back the parameter unchanged
    pe = m.pos_embed.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    same = torch.nn.functional.interpolate(pe, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same.permute(0, 2, 3, 1).reshape(1, 16, -1), m.pos_embed)


def test_pos_embed_interpolation_keeps_rows_and_columns():
    m = tiny()
    g = m.grid
    rows = torch.arange(g, dtype=torch.float32).view(g, 1).expand(g, g)  # depends on the row only
    cols = rows.T.clone()                                                 # on the column only
    with torch.no_grad():
        m.pos_embed.zero_()
        m.pos_embed[0, :, 0] = rows.reshape(-1)
        m.pos_embed[0, :, 1] = cols.reshape(-1)
    pe = m.pos_embed_for(8, 6).detach()            # 8 rows, 6 columns of tokens
    assert pe.shape == (1, 48, 32)
    grid_r = pe[0, :, 0].view(8, 6)
    grid_c = pe[0, :, 1].view(8, 6)
    # the row channel varies down the rows and not across; the column channel the other way
    torch.testing.assert_close(grid_r, grid_r[:, :1].expand(8, 6))
    torch.testing.assert_close(grid_c, grid_c[:1, :].expand(8, 6))
    assert (grid_r[1:, 0] >= grid_r[:-1, 0] - 1e-6).all() and grid_r[-1, 0] > grid_r[0, 0] + 2
    assert (grid_c[0, 1:] >= grid_c[0, :-1] - 1e-6).all() and grid_c[0, -1] > grid_c[0, 0] + 2
    assert torch.equal(pe[0, :, 2:], torch.zeros(48, 30))
    # and a forward at another size runs, with gradients reaching the 4x4 parameter
    # (a random projection of the output: the sum of a LayerNorm output has no gradient)
    m.zero_grad()
    (m(torch.randn(2, 3, 32, 24)) * torch.randn(2, 32)).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0


def test_drop_path_only_active_in_training():
    torch.manual_seed(0)
    m = tiny(drop_path_rate=0.5)
    rates = [blk.drop_path.p for blk in m.blocks]
    assert rates == pytest.approx([0.0, 0.5])  # linear in depth, from 0 to the rate
    plain = tiny()
    plain.load_state_dict(m.state_dict())
    x = torch.randn(8, 3, 16, 16)
    m.eval(), plain.eval()
    torch.testing.assert_close(m(x), plain(x))   # eval: drop-path is the identity
    torch.testing.assert_close(m(x), m(x))
    m.train(), plain.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)               # train: random per-sample drops
    torch.manual_seed(1)
    torch.testing.assert_close(m(x), a)          # ... drawn from the global generator
    torch.testing.assert_close(plain(x), plain(x))  # no drop-path: deterministic in train too


def test_drop_path_layer():
    d = DropPath(0.25)
    x = torch.ones(4000, 3)
    d.eval()
    assert d(x) is x
    d.train()
    torch.manual_seed(0)
    y = d(x)
    kept = y[:, 0] != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.75))  # kept samples are rescaled
    assert (y[~kept] == 0).all() and (y == y[:, :1]).all()           # one decision per sample
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert DropPath(0.0).train()(x) is x


def test_attention_checks_heads_and_matches_manual_softmax():
    with pytest.raises(ValueError, match="not divisible"):
        Attention(10, num_heads=3)
    torch.manual_seed(0)
    att = Attention(8, num_heads=2).eval()
    x = torch.randn(2, 5, 8)
    q, k, v = att.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)   # scale 1/sqrt(head_dim = 4)
    ref = att.proj((w @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(att(x), ref, atol=1e-6, rtol=1e-5)
