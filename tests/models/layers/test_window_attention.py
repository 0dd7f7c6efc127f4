"""Window helpers, window attention, the shifted-window block and patch merging, each against
a reference written out here independently of the code under test."""
from __future__ import annotations

import math

import pytest
import torch

import keel.models.layers.window_attention as wa
from keel.models.layers.window_attention import PatchMerging, SwinBlock, WindowAttention
from keel.models.layers.windows import shifted_window_mask, window_partition, window_reverse

M = -100.0


def test_window_partition_and_reverse_round_trip():
    x = torch.randn(2, 6, 8, 3)
    w = window_partition(x, (3, 4))
    assert w.shape == (2 * 2 * 2, 12, 3)
    # windows run image by image, then row-major over the window grid; tokens row-major inside
    torch.testing.assert_close(w[1], x[0, 0:3, 4:8].reshape(12, 3), rtol=0, atol=0)
    torch.testing.assert_close(w[2 + 4], x[1, 3:6, 0:4].reshape(12, 3), rtol=0, atol=0)
    assert torch.equal(window_reverse(w, (3, 4), 6, 8), x)


def test_shifted_mask_by_hand_4x4_window_2_shift_1():
    mask = shifted_window_mask(4, 4, (2, 2), (1, 1))
    assert mask.shape == (4, 4, 4)

    def from_groups(g):  # 0 between tokens of the same region, -100 across regions
        g = torch.tensor(g)
        return torch.where(g[:, None] == g[None, :], 0.0, M)

    # After rolling by -1 the last row and column hold the wrapped-around first row and column.
    # Window 0 (rows 0-1, cols 0-1) is one region; window 1 (cols 2-3) splits col 2 | col 3;
    # window 2 (rows 2-3) splits row 2 | row 3; window 3 splits into four single tokens.
    expected = torch.stack([
        from_groups([0, 0, 0, 0]),
        from_groups([0, 1, 0, 1]),
        from_groups([0, 0, 1, 1]),
        from_groups([0, 1, 2, 3]),
    ])
    assert torch.equal(mask, expected)
    assert torch.equal(shifted_window_mask(4, 4, (2, 2), (0, 0)), torch.zeros(4, 4, 4))


def test_shifted_mask_shift_along_one_axis_only():
    # the block shifts only along axes longer than the window; the other axis is one region
    mask = shifted_window_mask(2, 4, (2, 2), (0, 1))
    cols = torch.tensor([0, 1, 0, 1])
    assert torch.equal(mask[0], torch.zeros(4, 4))
    assert torch.equal(mask[1], torch.where(cols[:, None] == cols[None, :], 0.0, M))


def naive_bias(table: torch.Tensor, window, table_window) -> torch.Tensor:
    """(heads, N, N): the table row of each token pair's (row, col) offset, pair by pair."""
    wh, ww = window
    th, tw = table_window
    n = wh * ww
    out = torch.empty(table.shape[1], n, n)
    for i in range(n):
        for j in range(n):
            dr, dc = i // ww - j // ww, i % ww - j % ww
            out[:, i, j] = table[(dr + th - 1) * (2 * tw - 1) + dc + tw - 1]
    return out


def naive_window_attention(att: WindowAttention, x, mask, window):
    """Loop over windows and heads with an explicit softmax."""
    B_, N, C = x.shape
    h = att.num_heads
    d = C // h
    bias = None if att.rel_pos is None else naive_bias(att.rel_pos.relative_position_bias_table, window, att.window)
    outs = []
    for b in range(B_):
        qkv = att.qkv(x[b]).view(N, 3, h, d)
        heads = []
        for hd in range(h):
            q, k, v = qkv[:, 0, hd], qkv[:, 1, hd], qkv[:, 2, hd]
            logits = q @ k.T / math.sqrt(d)
            if bias is not None:
                logits = logits + bias[hd]
            if mask is not None:
                logits = logits + mask[b % mask.shape[0]]  # windows are numbered image by image
            heads.append(torch.softmax(logits, -1) @ v)
        outs.append(att.proj(torch.cat(heads, -1)))
    return torch.stack(outs)


@pytest.mark.parametrize("grad", [True, False])  # learnt bias on the CPU: softmax written out | SDPA
@pytest.mark.parametrize("built, used, rel_pos, with_mask", [
    ((2, 3), (2, 3), True, True),
    ((2, 3), (2, 3), True, False),
    ((2, 3), (2, 3), False, True),
    ((3, 3), (2, 3), True, True),     # a window shrunk to the map: the big table's entries
])
def test_window_attention_matches_naive(built, used, rel_pos, with_mask, grad):
    torch.manual_seed(0)
    att = WindowAttention(8, 2, built, rel_pos=rel_pos).eval()
    if rel_pos:
        with torch.no_grad():  # a bias large enough that a wrong entry shows
            att.rel_pos.relative_position_bias_table.normal_(0, 1.0)
    n = used[0] * used[1]
    nW = 4
    x = torch.randn(2 * nW, n, 8)
    mask = None
    if with_mask:
        mask = torch.where(torch.rand(nW, n, n) < 0.4, M, 0.0)
        mask[:, torch.arange(n), torch.arange(n)] = 0.0  # every token sees itself
    with torch.set_grad_enabled(grad):
        out = att(x, mask, used)
    ref = naive_window_attention(att, x, mask, used)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_window_attention_rejects_a_window_larger_than_built():
    att = WindowAttention(8, 2, (2, 2))
    with pytest.raises(ValueError, match="larger"):
        att(torch.randn(1, 6, 8), None, (2, 3))
    with pytest.raises(ValueError, match="divisible"):
        WindowAttention(10, 3, (2, 2))


def reference_block(blk: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The shifted-window block without rolling or cutting into windows: global attention on the
    zero-padded map where a token sees exactly the tokens of its own window of a grid displaced by
    -shift, cut (not wrapped) at the map's edges; the bias comes from each pair's offset."""
    B, H, W, C = x.shape
    (th, tw), (sh, sw) = blk.window, blk.shift
    wh, ww = min(th, H), min(tw, W)                 # Swin's rule for maps no larger than the window
    sh, sw = (0 if H <= th else sh), (0 if W <= tw else sw)
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    xn = blk.norm1(x)
    if blk.dwconv is not None:
        xn = xn + blk.dwconv(xn.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    xp = torch.zeros(B, Hp, Wp, C)
    xp[:, :H, :W] = xn
    att = blk.attn
    h, d = att.num_heads, C // att.num_heads
    q, k, v = att.qkv(xp.reshape(B, Hp * Wp, C)).view(B, Hp * Wp, 3, h, d).permute(2, 0, 3, 1, 4)
    r = torch.arange(Hp).repeat_interleave(Wp)
    c = torch.arange(Wp).repeat(Hp)
    gr, gc = torch.div(r - sh, wh, rounding_mode="floor"), torch.div(c - sw, ww, rounding_mode="floor")
    same = (gr[:, None] == gr[None, :]) & (gc[:, None] == gc[None, :])
    dr, dc = r[:, None] - r[None, :], c[:, None] - c[None, :]
    idx = ((dr + th - 1) * (2 * tw - 1) + dc + tw - 1).clamp(0, (2 * th - 1) * (2 * tw - 1) - 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if att.rel_pos is not None:
        logits = logits + att.rel_pos.relative_position_bias_table[idx].permute(2, 0, 1)
    a = torch.softmax(logits.masked_fill(~same, float("-inf")), -1) @ v
    a = att.proj(a.transpose(1, 2).reshape(B, Hp, Wp, C))[:, :H, :W]
    if blk.gamma1 is not None:
        a = a * blk.gamma1
    x = x + a
    m = blk.mlp(blk.norm2(x))
    return x + (m if blk.gamma2 is None else m * blk.gamma2)


@pytest.mark.parametrize("H, W, window, shift, kw", [
    (9, 11, 4, 2, {}),                  # padded to 12 x 12, shifted
    (8, 8, 4, 0, {}),                   # plain windows
    (5, 6, 7, 3, {}),                   # map inside one window: window 5 x 6, no shift
    (5, 10, 7, 3, {}),                  # window 5 x 7, shifted along the width only, padded
    (9, 11, 4, 2, {"conv_qkv": True, "layer_scale": 0.5}),
    (9, 11, 4, 2, {"rel_pos": False}),
])
@pytest.mark.parametrize("grad", [True, False])
def test_swin_block_matches_global_attention_reference(H, W, window, shift, kw, grad):
    torch.manual_seed(0)
    blk = SwinBlock(16, 2, window, shift, mlp_ratio=2, **kw).eval()
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if "relative_position_bias_table" in name or "gamma" in name or name.startswith("norm"):
                p.add_(torch.randn_like(p) * 0.5)  # away from init, so each term shows
    x = torch.randn(2, H, W, 16)
    with torch.set_grad_enabled(grad):
        out = blk(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference_block(blk, x), rtol=1e-5, atol=1e-5)


def test_swin_block_caches_the_shift_mask_outside_the_state_dict(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[:2])
        return shifted_window_mask(*args, **kwargs)

    monkeypatch.setattr(wa, "shifted_window_mask", counting)
    blk = SwinBlock(8, 2, 3, 1, mlp_ratio=1).eval()
    x = torch.randn(1, 6, 6, 8)
    first = blk(x)
    torch.testing.assert_close(blk(x), first)
    assert calls == [(6, 6)]
    blk(torch.randn(1, 7, 6, 8))           # another size: padded to 9 x 6, a new mask
    assert calls == [(6, 6), (9, 6)]
    assert not any("mask" in k or "index" in k for k in blk.state_dict())
    no_shift = SwinBlock(8, 2, 3, 0, mlp_ratio=1)
    no_shift(x)
    assert len(calls) == 2 and no_shift._mask_cache == {}


def test_conv_qkv_adds_a_depthwise_conv_that_changes_the_output():
    torch.manual_seed(0)
    plain = SwinBlock(16, 2, 4, 2, mlp_ratio=2).eval()
    conv = SwinBlock(16, 2, 4, 2, mlp_ratio=2, conv_qkv=True).eval()
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["dwconv.bias", "dwconv.weight"] and not unexpected
    assert conv.dwconv.weight.shape == (16, 1, 3, 3) and conv.dwconv.groups == 16
    x = torch.randn(1, 8, 8, 16)
    assert not torch.allclose(conv(x), plain(x), atol=1e-3)
    with torch.no_grad():
        conv.dwconv.weight.zero_()
        conv.dwconv.bias.zero_()
    torch.testing.assert_close(conv(x), plain(x))  # a zero conv adds nothing: x_n + 0
    conv.train()
    conv(x).square().sum().backward()
    assert conv.dwconv.weight.grad.abs().sum() > 0


def test_layer_scale_scales_both_residual_branches():
    torch.manual_seed(0)
    plain = SwinBlock(16, 2, 4, 2, mlp_ratio=2).eval()
    scaled = SwinBlock(16, 2, 4, 2, mlp_ratio=2, layer_scale=1e-5).eval()
    assert torch.equal(scaled.gamma1, torch.full((16,), 1e-5)) and scaled.gamma2.shape == (16,)
    scaled.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 8, 8, 16)
    torch.testing.assert_close(scaled(x), x, atol=1e-3, rtol=0)  # ~identity at 1e-5
    with torch.no_grad():
        scaled.gamma1.fill_(1.0)
        scaled.gamma2.fill_(1.0)
    torch.testing.assert_close(scaled(x), plain(x))
    with torch.no_grad():
        scaled.gamma2.zero_()                  # only the attention branch left
    only_attn = x + plain._attention(plain.norm1(x))
    torch.testing.assert_close(scaled(x), only_attn)


def test_block_drop_path_only_in_training():
    torch.manual_seed(0)
    blk = SwinBlock(8, 2, 3, 1, mlp_ratio=1, drop_path=0.5)
    x = torch.randn(16, 6, 6, 8)
    blk.eval()
    torch.testing.assert_close(blk(x), blk(x))
    blk.train()
    torch.manual_seed(1)
    a = blk(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, blk(x))


def test_shift_must_be_smaller_than_the_window():
    with pytest.raises(ValueError, match="shift"):
        SwinBlock(8, 2, 3, 3)


@pytest.mark.parametrize("H, W", [(4, 6), (5, 7)])
def test_patch_merging_official_order_and_odd_sizes(H, W):
    torch.manual_seed(0)
    pm = PatchMerging(4)
    with torch.no_grad():
        pm.norm.weight.normal_()
    assert pm.reduction.bias is None and pm.reduction.weight.shape == (8, 16)
    x = torch.randn(2, H, W, 4)
    xp = torch.nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    # the official Swin: x0 = even rows/even cols, x1 = odd rows/even cols, x2 = even/odd, x3 = odd/odd
    cat = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], -1)
    out = pm(x)
    assert out.shape == (2, (H + 1) // 2, (W + 1) // 2, 8)
    torch.testing.assert_close(out, pm.reduction(pm.norm(cat)))


def test_patch_merging_matches_timm():
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    ref = timm_swin.PatchMerging(6)
    with torch.no_grad():
        ref.norm.weight.normal_()
        ref.norm.bias.normal_()
    pm = PatchMerging(6)
    pm.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 5, 8, 6)
    torch.testing.assert_close(pm(x), ref(x))


def test_lepe_adds_a_depthwise_conv_of_v_within_each_window():
    torch.manual_seed(0)
    from keel.models.layers.window_attention import WindowAttention as WA
    dim, heads, win = 8, 2, (3, 3)
    attn = WA(dim, heads, win, rel_pos=False, lepe=True).eval()
    plain = WA(dim, heads, win, rel_pos=False).eval()
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("lepe")})
    x = torch.randn(4, 9, dim)
    with torch.no_grad():
        v = attn.qkv(x)[..., 2 * dim:]                                   # (B_, N, C): V of every token
        conv = torch.nn.functional.conv2d(v.transpose(1, 2).reshape(4, dim, 3, 3), attn.lepe.conv.weight,
                                          attn.lepe.conv.bias, padding=1, groups=dim)
        # plain attention output before its projection, plus the conv of V, then the projection
        expected = plain.proj(_pre_proj(plain, x) + conv.flatten(2).transpose(1, 2))
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def _pre_proj(attn, x):
    """The attention output before the projection, by a hand-written softmax."""
    B_, N, C = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / (C // h) ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2).reshape(B_, N, C)
