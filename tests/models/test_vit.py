"""The Vision Transformer: registry, shapes, position-embedding interpolation, drop-path, size,
relative position bias, ViTDet windowed blocks and decomposed relative positions, timm
conversion."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import keel
from keel.models.layers import Attention, DropPath
from keel.models.registry import register_model
from keel.convert import from_timm, to_timm
from keel.models.layers.position import interpolate_pos_embed, resize_rel_pos
from keel.models.vit import TIMM_NAMES, VisionTransformer, ViTConfig, _bias_for_grid

VITS = ["vit_base_patch16", "vit_small_patch16", "vit_tiny_patch16", "vit_tiny_patch4_32", "vit_large_patch16",
        "vit_small_patch8", "vit_base_patch8", "vit_large_patch14"]


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
    # with 1000 classes, as the papers count; pos_embed includes the class token's entry (as in
    # timm and DeiT), so these are timm's exact counts
    ("vit_large_patch16", 304_326_632),  # ViT-L/16: 304.3M (DeiT III README)
    ("vit_base_patch16", 86_567_656),    # DeiT-B: 86.6M
    ("vit_small_patch16", 22_050_664),   # DeiT-S: 22.1M
    ("vit_tiny_patch16", 5_717_416),     # DeiT-Ti: 5.7M
])
def test_parameter_count(name, expected):
    with torch.device("meta"):  # counting needs no memory and no initialisation
        m = keel.create_model(name, num_classes=1000)
    assert n_params(m) == expected


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
    # timm's layout: the class token's entry first, then the 4x4 patch grid
    assert m.grid == 4 and m.pos_embed.shape == (1, 1 + 16, 32)
    pe = m.pos_embed_for(4, 4)
    assert pe.data_ptr() == m.pos_embed[:, 1:].data_ptr() and pe.shape == (1, 16, 32)  # a view
    # the interpolation path, taken at the native grid, gives back the parameter unchanged
    grid = m.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    same = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(same.permute(0, 2, 3, 1).reshape(1, 16, -1), pe)
    # the class token carries its own position, added before the blocks
    torch.testing.assert_close(m.prefix_tokens(2), (m.cls_token + m.pos_embed[:, :1]).expand(2, 1, 32))


def test_pos_embed_interpolation_keeps_rows_and_columns():
    m = tiny()
    g = m.grid
    rows = torch.arange(g, dtype=torch.float32).view(g, 1).expand(g, g)  # depends on the row only
    cols = rows.T.clone()                                                 # on the column only
    with torch.no_grad():
        m.pos_embed.zero_()
        m.pos_embed[0, 1:, 0] = rows.reshape(-1)
        m.pos_embed[0, 1:, 1] = cols.reshape(-1)
        m.pos_embed[0, 0] = 7.0  # the class token's entry is never interpolated
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


def test_drop_path_only_active_in_training(drop_path_only_in_training):
    torch.manual_seed(0)
    m = tiny(drop_path_rate=0.5)
    rates = [blk.drop_path.p for blk in m.blocks]
    assert rates == pytest.approx([0.0, 0.5])  # linear in depth, from 0 to the rate
    plain = tiny()
    plain.load_state_dict(m.state_dict())
    x = torch.randn(8, 3, 16, 16)
    drop_path_only_in_training(m, plain, x)
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


# ---------------------------------------------------------------- larger grids, rel-pos, windows
def test_patch_size_keyword_overrides_the_name_and_feature_map_is_stride_16():
    m = keel.create_model("vit_tiny_patch16", img_size=64, depth=1, dim=32, num_heads=2).eval()
    assert m.feature_info == [{"stride": 16, "channels": 32}]
    x = torch.randn(2, 3, 64, 96)
    (fm,) = m.feature_maps(x)
    assert fm.shape == (2, 32, 4, 6)
    torch.testing.assert_close(fm.flatten(2).transpose(1, 2), m.forward_tokens(x)[:, 1:])
    p14 = keel.create_model("vit_tiny_patch16", patch_size=14, img_size=56, depth=1, dim=32, num_heads=2)
    assert p14.grid == 4 and p14.feature_info[0]["stride"] == 14
    assert p14.feature_maps(torch.randn(1, 3, 56, 70))[0].shape == (1, 32, 4, 5)


def test_other_resolution_uses_the_interpolated_table():
    # a model built at 16 px and run at 24 px == a model built at 24 px holding the resampled table
    torch.manual_seed(0)
    m = tiny().eval()
    big = tiny(img_size=24).eval()
    sd = m.state_dict()
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], interpolate_pos_embed(sd["pos_embed"][:, 1:], (4, 4), (6, 6))], 1)
    big.load_state_dict(sd)
    x = torch.randn(1, 3, 24, 24)
    torch.testing.assert_close(m(x), big(x))


def plain_and_windowed(window, global_blocks=(), **kw):
    """Two patch-token-only ViTs with the same weights, one windowed."""
    torch.manual_seed(0)
    plain = tiny(class_token=False, global_pool="avg", **kw).eval()
    win = tiny(class_token=False, global_pool="avg", window_size=window, global_blocks=global_blocks, **kw).eval()
    win.load_state_dict(plain.state_dict())
    return plain, win


@pytest.mark.parametrize("window", [4, 6])  # the grid exactly; larger (padded, pad masked out)
def test_window_covering_the_grid_is_the_plain_vit(window):
    plain, win = plain_and_windowed(window)
    assert [b.window for b in win.blocks] == [window, window]
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(win.forward_tokens(x), plain.forward_tokens(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain_and_windowed(2)[1](x), plain(x))  # small windows do differ


def test_windowed_block_sees_only_its_window_and_a_global_block_everything():
    _, m = plain_and_windowed(2, global_blocks=(1,))
    windowed, glob = m.blocks
    assert (windowed.window, glob.window) == (2, 0)
    torch.manual_seed(1)
    x = torch.randn(1, 16, 32)          # a 4x4 grid: four 2x2 windows
    x2 = x.clone()
    x2[0, 0] += torch.randn(32)         # token (0, 0): top-left window (not a constant: norm1 removes it)
    in_window = torch.zeros(4, 4, dtype=torch.bool)
    in_window[:2, :2] = True
    in_window = in_window.view(-1)
    with torch.no_grad():
        a, b = windowed(x, (4, 4)), windowed(x2, (4, 4))
        torch.testing.assert_close(a[0, ~in_window], b[0, ~in_window], rtol=0, atol=0)
        assert (a[0, in_window] - b[0, in_window]).abs().amax(-1).min() > 1e-4
        ga, gb = glob(x, (4, 4)), glob(x2, (4, 4))
        assert (ga - gb)[0].abs().amax(-1).min() > 1e-4   # every token moved
    # through the whole model: the global block carries the change to every position
    img = torch.randn(1, 3, 16, 16)
    img2 = img.clone()
    img2[..., :4, :4] += torch.randn(3, 4, 4)
    fa, fb = m.feature_maps(img)[0], m.feature_maps(img2)[0]
    assert (fa - fb).abs().amax(1).min() > 1e-4


def test_padded_windows_attend_to_real_tokens_only():
    # a 3x3 grid in 2x2 windows: padded to 4x4; the bottom-right window holds one real token,
    # which must then attend to itself alone (as a global block run on that token)
    _, m = plain_and_windowed(2, depth=1)
    blk = m.blocks[0]
    torch.manual_seed(2)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        out = blk(x, (3, 3))
        blk.window = 0
        alone = blk(x[:, 8:9])
        top_left = blk(x[:, [0, 1, 3, 4]])
    torch.testing.assert_close(out[:, 8:9], alone)
    torch.testing.assert_close(out[:, [0, 1, 3, 4]], top_left)


def test_windowed_vit_runs_at_any_size_with_rel_pos_and_backward():
    m = tiny(class_token=False, global_pool="avg", window_size=3, global_blocks=(0,), rel_pos=True)
    assert m.blocks[0].rel_pos.window == (4, 4) and m.blocks[1].rel_pos.window == (3, 3)
    with torch.no_grad():
        for blk in m.blocks:
            blk.rel_pos.relative_position_bias_table.normal_()
    (m.feature_maps(torch.randn(2, 3, 20, 28))[0] * torch.randn(2, 32, 5, 7)).sum().backward()
    assert all(blk.rel_pos.relative_position_bias_table.grad.abs().sum() > 0 for blk in m.blocks)


def test_rel_pos_starts_at_zero_and_leaves_the_class_token_unbiased():
    torch.manual_seed(0)
    plain = tiny().eval()
    rel = tiny(rel_pos=True).eval()
    missing = rel.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"blocks.{i}.rel_pos.relative_position_bias_table" for i in range(2)]
    x = torch.randn(2, 3, 16, 16)
    # zero tables change nothing (but round-off: a zero mask picks another SDPA kernel)
    torch.testing.assert_close(rel(x), plain(x), rtol=1e-5, atol=1e-6)
    blk = rel.blocks[0]
    assert blk.rel_pos.relative_position_bias_table.shape == ((2 * 4 - 1) ** 2, 2)
    with torch.no_grad():
        blk.rel_pos.relative_position_bias_table.normal_()
    bias = blk._global_bias((4, 4))
    assert bias.shape == (2, 17, 17)
    assert not bias[:, 0].any() and not bias[:, :, 0].any()
    torch.testing.assert_close(bias[:, 1:, 1:], blk.rel_pos())
    # at the same offset, the same bias: (0,0)->(1,1) and (2,2)->(3,3)
    assert torch.equal(bias[:, 1 + 0, 1 + 5], bias[:, 1 + 10, 1 + 15])
    assert not torch.allclose(rel(x), plain(x))
    # another grid: the table is resampled, and at the same size nothing is
    assert blk._global_bias((6, 5)).shape == (2, 31, 31)
    torch.testing.assert_close(_bias_for_grid(blk.rel_pos, (4, 4)), blk.rel_pos())
    assert rel(torch.randn(1, 3, 24, 20)).shape == (1, 32)


@pytest.mark.parametrize("kw, match", [
    (dict(window_size=2), "class_token=False"),
    (dict(class_token=False), "global_pool='avg'"),
    (dict(global_pool="max"), "'token' or 'avg'"),
    (dict(class_token=False, global_pool="avg", window_size=2, global_blocks=(2,)), "block indices"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_global_blocks_from_a_list_and_meta_build_of_vitdet_base():
    with torch.device("meta"):
        m = keel.create_model("vit_base_patch16", img_size=1024, window_size=14, global_blocks=[2, 5, 8, 11],
                              class_token=False, global_pool="avg", rel_pos=True)
    assert m.cfg.global_blocks == (2, 5, 8, 11)
    assert [b.window for b in m.blocks] == [14, 14, 0] * 4
    assert m.blocks[2].rel_pos.window == (64, 64) and m.blocks[0].rel_pos.window == (14, 14)


# ---------------------------------------------------------------- decomposed relative positions
def decomposed_tables(m: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in m.named_parameters() if n.endswith(("attn.rel_pos_h", "attn.rel_pos_w"))]


def randomize_tables(m: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in decomposed_tables(m):
            p.normal_(std=0.5)
    return m


def reference_attention(attn, x, coords, rel_h, rel_w, prefix=0):
    """Attention of one image's tokens x (M, C) written out: the logit of query i and key j gets
    q_i . rel_h[r_i - r_j + gh - 1] + q_i . rel_w[c_i - c_j + gw - 1] (tables of 2g-1 rows),
    (r, c) = ``coords`` of the tokens after the first ``prefix``. -> (output (M, C), weights)."""
    M, C = x.shape
    hd = C // attn.num_heads
    q, k, v = attn.qkv(x).view(M, 3, attn.num_heads, hd).permute(1, 2, 0, 3)   # (heads, M, hd)
    logits = q @ k.transpose(-1, -2) * hd ** -0.5
    gh, gw = (len(rel_h) + 1) // 2, (len(rel_w) + 1) // 2
    extra = torch.zeros_like(logits)
    for i, (ri, ci) in enumerate(coords):
        for j, (rj, cj) in enumerate(coords):
            qi = q[:, prefix + i]
            extra[:, prefix + i, prefix + j] = qi @ rel_h[ri - rj + gh - 1] + qi @ rel_w[ci - cj + gw - 1]
    weights = (logits + extra).softmax(-1)
    return attn.proj((weights @ v).transpose(0, 1).reshape(M, C)), weights


def reference_global_block(blk, x, hw, rel_h, rel_w):
    """A global block (prefix tokens first) with the reference attention, image by image."""
    coords = [(r, c) for r in range(hw[0]) for c in range(hw[1])]
    prefix = x.shape[1] - len(coords)
    y = blk.norm1(x)
    att = torch.stack([reference_attention(blk.attn, yi, coords, rel_h, rel_w, prefix)[0] for yi in y])
    x = x + att
    return x + blk.mlp(blk.norm2(x))


def test_zero_decomposed_tables_are_the_plain_vit():
    torch.manual_seed(0)
    plain = tiny().eval()
    rel = tiny(rel_pos_decomposed=True).eval()
    missing = rel.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"blocks.{i}.attn.rel_pos_{a}" for i in range(2) for a in "hw"]
    # timm's/detectron2's names and shapes: (2 * 4 - 1, head_dim) on the 4x4 grid
    assert rel.blocks[0].attn.rel_pos_h.shape == rel.blocks[0].attn.rel_pos_w.shape == (7, 16)
    assert all(not t.any() for t in decomposed_tables(rel))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rel(x), plain(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(rel(x[..., :12, :20]), plain(x[..., :12, :20]), rtol=0, atol=1e-6)
    # windowed (3x3 windows on a 4x5 grid: padded) with a global block
    plain, win = plain_and_windowed(3, global_blocks=(1,))
    rel = tiny(class_token=False, global_pool="avg", window_size=3, global_blocks=(1,), rel_pos_decomposed=True)
    rel.load_state_dict(plain.state_dict(), strict=False)
    assert [b.attn.rel_pos_h.shape[0] for b in rel.blocks] == [5, 7]   # window 3, grid 4
    x = torch.randn(2, 3, 16, 20)
    with torch.no_grad():
        torch.testing.assert_close(rel.eval()(x), win(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rel_pos_decomposed"):
        rel.forward_visible(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="rel_pos_h"):
        to_timm("vit_tiny_patch4_32", rel.state_dict())


def test_decomposed_global_block_matches_the_written_out_attention_and_its_gradients():
    m = randomize_tables(tiny(rel_pos_decomposed=True)).eval()
    blk = m.blocks[0]
    torch.manual_seed(4)
    x = torch.randn(2, 1 + 16, 32)          # class token + 4x4 grid
    r = torch.randn(2, 17, 32)
    out = blk(x, (4, 4))
    ref = reference_global_block(blk, x, (4, 4), blk.attn.rel_pos_h, blk.attn.rel_pos_w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    zero = torch.zeros_like(blk.attn.rel_pos_h)
    assert (out - reference_global_block(blk, x, (4, 4), zero, zero)).abs().max() > 1e-2   # the tables matter
    grads = torch.autograd.grad((out * r).sum(), [blk.attn.rel_pos_h, blk.attn.rel_pos_w])
    grads_ref = torch.autograd.grad((ref * r).sum(), [blk.attn.rel_pos_h, blk.attn.rel_pos_w])
    for g, g_ref in zip(grads, grads_ref):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    # last_self_attention applies the same term
    img = torch.randn(1, 3, 16, 16)
    weights = m.last_self_attention(img)
    captured = {}
    m.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.update(x=inp[0]))
    m.forward_tokens(img)
    last = m.blocks[-1]
    coords = [(i, j) for i in range(4) for j in range(4)]
    _, w_ref = reference_attention(last.attn, last.norm1(captured["x"][0]), coords, last.attn.rel_pos_h,
                                   last.attn.rel_pos_w, prefix=1)
    torch.testing.assert_close(weights[0], w_ref, atol=1e-5, rtol=1e-5)


def test_decomposed_windowed_block_with_padding_matches_the_written_out_attention():
    # 3x3 windows on a 4x5 grid: padded to 6x6; padded keys take no part; window coordinates
    m = randomize_tables(tiny(class_token=False, global_pool="avg", window_size=3, rel_pos_decomposed=True)).eval()
    blk = m.blocks[0]
    torch.manual_seed(5)
    h, w = 4, 5
    x = torch.randn(2, h * w, 32)
    y = blk.norm1(x)
    att = torch.zeros_like(x)
    for b in range(2):
        for r0 in (0, 3):
            for c0 in (0, 3):
                cells = [(r, c) for r in range(r0, min(r0 + 3, h)) for c in range(c0, min(c0 + 3, w))]
                idx = [r * w + c for r, c in cells]
                local = [(r - r0, c - c0) for r, c in cells]
                att[b, idx] = reference_attention(blk.attn, y[b, idx], local, blk.attn.rel_pos_h,
                                                  blk.attn.rel_pos_w)[0]
    ref = x + att
    ref = ref + blk.mlp(blk.norm2(ref))
    out = blk(x, (h, w))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    r = torch.randn_like(out)
    grads = torch.autograd.grad((out * r).sum(), [blk.attn.rel_pos_h, blk.attn.rel_pos_w])
    grads_ref = torch.autograd.grad((ref * r).sum(), [blk.attn.rel_pos_h, blk.attn.rel_pos_w])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_decomposed_tables_are_resampled_linearly_for_other_grids():
    # by hand: 3 rows -> 5, half-pixel centres, source position (i + 0.5) * 3/5 - 0.5 clamped
    t = torch.tensor([[1.0], [4.0], [10.0]])
    expect = []
    for i in range(5):
        s = min(max((i + 0.5) * 3 / 5 - 0.5, 0.0), 2.0)
        lo = int(s)
        hi = min(lo + 1, 2)
        expect.append(t[lo, 0] * (1 - (s - lo)) + t[hi, 0] * (s - lo))
    torch.testing.assert_close(resize_rel_pos(t, 5)[:, 0], torch.stack(expect))
    assert resize_rel_pos(t, 3) is t
    # a global block learnt on the 4x4 grid (7 rows) run on 3x6: 5 rows for h, 11 for w
    m = randomize_tables(tiny(rel_pos_decomposed=True)).eval()
    blk = m.blocks[1]
    torch.manual_seed(6)
    x = torch.randn(2, 1 + 18, 32)
    rel_h = F.interpolate(blk.attn.rel_pos_h.T[None], size=5, mode="linear", align_corners=False)[0].T
    rel_w = F.interpolate(blk.attn.rel_pos_w.T[None], size=11, mode="linear", align_corners=False)[0].T
    with torch.no_grad():
        torch.testing.assert_close(blk(x, (3, 6)), reference_global_block(blk, x, (3, 6), rel_h, rel_w),
                                   atol=1e-5, rtol=1e-5)
    assert m(torch.randn(1, 3, 12, 24)).shape == (1, 32)


def test_gradients_reach_every_decomposed_table():
    m = randomize_tables(tiny(class_token=False, global_pool="avg", window_size=3, global_blocks=(0,),
                              rel_pos_decomposed=True))
    assert [b.attn.rel_pos_w.shape[0] for b in m.blocks] == [7, 5]
    (m.feature_maps(torch.randn(2, 3, 20, 28))[0] * torch.randn(2, 32, 5, 7)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in decomposed_tables(m))


def test_decomposed_and_bias_relative_positions_add():
    torch.manual_seed(0)
    both = tiny(rel_pos=True, rel_pos_decomposed=True).eval()
    with torch.no_grad():
        for blk in both.blocks:
            blk.rel_pos.relative_position_bias_table.normal_()
    randomize_tables(both)
    blk = both.blocks[0]
    x = torch.randn(1, 17, 32)
    with torch.no_grad():
        y = blk.norm1(x)
        q = blk.attn.heads(y)[0]
        mask = blk.attn.rel_pos_mask(q, (4, 4), 1, blk._global_bias((4, 4)))
        torch.testing.assert_close(mask, blk.attn.rel_pos_mask(q, (4, 4), 1) + blk._global_bias((4, 4)))
        out = x + blk.attn.attend(*blk.attn.heads(y), mask)
        torch.testing.assert_close(blk(x, (4, 4)), out + blk.mlp(blk.norm2(out)))


# ---------------------------------------------------------------- timm
@pytest.mark.parametrize("size", [224, 160])
def test_matches_timm_and_converts_both_ways(size):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAMES["vit_tiny_patch16"], pretrained=False, num_classes=5, img_size=size).eval()
    sd = ref.state_dict()
    m = keel.create_model("vit_tiny_patch16", num_classes=5, img_size=size).eval()
    m.load_state_dict(from_timm("vit_tiny_patch16", sd), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.embed(x), ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   rtol=1e-5, atol=1e-5)
    back = to_timm("vit_tiny_patch16", m.state_dict())
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_conversion_refuses_keys_without_counterpart():
    m = tiny(rel_pos=True)
    with pytest.raises(ValueError, match="rel_pos.relative_position_bias_table"):
        to_timm("vit_tiny_patch4_32", m.state_dict())
    sd = tiny().state_dict()
    sd["blocks.0.ls1.gamma"] = torch.ones(32)   # timm's layer scale (DeiT III): not in keel's ViT
    with pytest.raises(ValueError, match="ls1.gamma"):
        from_timm("vit_tiny_patch4_32", sd)


def test_every_timm_name_has_the_same_parameter_count_as_timm():
    timm = pytest.importorskip("timm")
    assert set(TIMM_NAMES) <= set(keel.list_models())
    for name, timm_name in TIMM_NAMES.items():
        with torch.device("meta"):
            ours = n_params(keel.create_model(name, num_classes=1000))
            theirs = n_params(timm.create_model(timm_name, pretrained=False, num_classes=1000))
        assert ours == theirs, name


def test_last_self_attention_is_the_softmax_the_last_block_applies():
    torch.manual_seed(0)
    m = keel.create_model("vit_tiny_patch4_32", img_size=16, depth=2, dim=48, num_heads=3).eval()
    x = torch.randn(2, 3, 16, 16)
    a = m.last_self_attention(x)
    assert a.shape == (2, 3, 17, 17)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 17))
    # Applying these weights to V by hand and projecting gives the block's own attention output.
    captured = {}
    m.blocks[-1].attn.register_forward_hook(lambda mod, inp, out: captured.update(inp=inp[0], out=out))
    m.forward_tokens(x)
    attn = m.blocks[-1].attn
    y = captured["inp"]
    B, N, C = y.shape
    v = attn.qkv(y).reshape(B, N, 3, 3, C // 3).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out, captured["out"], atol=1e-5, rtol=1e-5)
