"""Cross-shaped window attention against a naive reference: stripes, LePE, padding, last stage."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keel.models.layers.cross_attention import CrossShapedAttention, CSWinBlock


def naive_stripes(m: CrossShapedAttention, x: torch.Tensor) -> torch.Tensor:
    """Loop over every stripe of each branch with an explicit softmax; stripes are clipped at the
    map border (what padding + key masking must amount to). LePE: the branch's 3x3 depth-wise conv
    on V of the stripe alone, zero outside it."""
    B, H, W, C = x.shape
    qkv = m.qkv(x).view(B, H, W, 3, C)
    s = m.split_size
    if m.last_stage:
        branches = [(0, C, H, W)]
    else:  # first half: full-height stripes s wide; second half: full-width stripes s high
        branches = [(0, C // 2, H, s), (C // 2, C, s, W)]
    heads = m.num_heads // len(branches)
    out = torch.zeros(B, H, W, C)
    for bi, (c0, c1, sh, sw) in enumerate(branches):
        c = c1 - c0
        d = c // heads
        for b in range(B):
            for i0 in range(0, H, sh):
                for j0 in range(0, W, sw):
                    tile = qkv[b, i0:i0 + sh, j0:j0 + sw, :, c0:c1]
                    th, tw = tile.shape[:2]
                    q, k, v = tile.reshape(th * tw, 3, c).unbind(1)
                    o = torch.empty(th * tw, c)
                    for h in range(heads):
                        hs = slice(h * d, (h + 1) * d)
                        logits = q[:, hs] @ k[:, hs].T / d ** 0.5
                        p = logits.exp() / logits.exp().sum(-1, keepdim=True)
                        o[:, hs] = p @ v[:, hs]
                    if m.lepe is not None:
                        conv = m.lepe[bi].conv
                        img = v.T.reshape(1, c, th, tw)
                        o = o + F.conv2d(img, conv.weight, conv.bias, padding=1, groups=c)[0].flatten(1).T
                    out[b, i0:i0 + th, j0:j0 + tw, c0:c1] = o.view(th, tw, c)
    return m.proj(out)


@pytest.mark.parametrize("hw, split, heads", [((14, 14), 7, 4), ((8, 8), 2, 4), ((8, 8), 1, 2), ((6, 10), 2, 4)])
def test_matches_naive_stripes(hw, split, heads):
    torch.manual_seed(0)
    m = CrossShapedAttention(16, heads, split).eval()
    x = torch.randn(2, *hw, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), naive_stripes(m, x), rtol=1e-5, atol=1e-5)


def test_lepe_is_per_stripe_not_whole_map():
    """The official get_lepe convolves V inside each stripe: a whole-map conv differs at stripe
    borders, so the reference above must tell them apart."""
    torch.manual_seed(0)
    m = CrossShapedAttention(16, 4, 2).eval()
    x = torch.randn(1, 8, 8, 16)
    ref = naive_stripes(m, x)
    no_lepe = CrossShapedAttention(16, 4, 2, lepe=False).eval()
    no_lepe.load_state_dict({k: v for k, v in m.state_dict().items() if "lepe" not in k})
    with torch.no_grad():
        v = m.qkv(x)[..., 2 * 16:]
        whole = torch.cat([m.lepe[i].conv(v[..., i * 8:(i + 1) * 8].permute(0, 3, 1, 2)) for i in range(2)], 1)
        wrong = no_lepe(x) + m.proj(whole.permute(0, 2, 3, 1)) - m.proj.bias
        assert not torch.allclose(wrong, ref, atol=1e-4)
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(12, 12), (12, 9), (5, 12), (3, 4)])
def test_padding_matches_clipped_stripes(hw):
    """12 -> padded to 14 with split 7: the padded keys must not take any attention weight."""
    torch.manual_seed(0)
    m = CrossShapedAttention(16, 4, 7).eval()
    x = torch.randn(2, *hw, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), naive_stripes(m, x), rtol=1e-5, atol=1e-5)


def test_padded_region_content_is_ignored(monkeypatch):
    """Whatever the padded positions hold, real tokens' outputs do not change (keys masked).
    Without LePE, since LePE's conv reads zeros there by design (its own zero padding)."""
    torch.manual_seed(0)
    m = CrossShapedAttention(16, 4, 7, lepe=False).eval()
    x = torch.randn(1, 12, 12, 16)
    with torch.no_grad():
        ref = m(x)
        pad = F.pad
        monkeypatch.setattr(F, "pad", lambda t, p, *a, **k: pad(t, p, value=37.0))
        assert F.pad(torch.zeros(1), (0, 1))[1] == 37.0
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_receptive_field_is_a_cross():
    """Token (10, 10) of a 12x12 map, split 7 (the padded last stripes): its output depends on
    exactly the columns 7..11 and rows 7..11 (its two stripes), nowhere else."""
    torch.manual_seed(0)
    m = CrossShapedAttention(16, 4, 7)
    x = torch.randn(1, 12, 12, 16, requires_grad=True)
    m(x)[0, 10, 10].sum().backward()
    touched = x.grad[0].abs().sum(-1) > 0
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[:, 7:] = True
    expected[7:, :] = True
    assert torch.equal(touched, expected)


@pytest.mark.parametrize("hw", [(7, 7), (6, 8)])
def test_last_stage_is_full_attention(hw):
    torch.manual_seed(0)
    m = CrossShapedAttention(32, 4, 7, last_stage=True).eval()
    assert m.branches == 1 and len(m.lepe) == 1
    x = torch.randn(2, *hw, 32)
    B, H, W, C = x.shape
    with torch.no_grad():
        q, k, v = m.qkv(x).view(B, H * W, 3, 4, 8).permute(2, 0, 3, 1, 4)
        p = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
        o = (p @ v).transpose(1, 2).reshape(B, H, W, C)
        vimg = v.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
        o = o + m.lepe[0].conv(vimg).permute(0, 2, 3, 1)
        torch.testing.assert_close(m(x), m.proj(o), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(x), naive_stripes(m, x), rtol=1e-5, atol=1e-5)


def test_two_branches_on_a_small_map_equal_the_global_branch():
    """Stripes longer than the map cover it whole: two half-head branches then are one global
    attention with all heads (the official code switches to last_stage there; keel need not)."""
    torch.manual_seed(0)
    two = CrossShapedAttention(32, 4, 7).eval()
    one = CrossShapedAttention(32, 4, 7, last_stage=True).eval()
    sd = two.state_dict()
    for name in ("weight", "bias"):
        sd[f"lepe.0.conv.{name}"] = torch.cat([sd.pop(f"lepe.0.conv.{name}"), sd.pop(f"lepe.1.conv.{name}")])
    one.load_state_dict(sd)
    x = torch.randn(1, 7, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(two(x), one(x), rtol=1e-5, atol=1e-5)


def test_tokens_with_hw_equal_maps():
    torch.manual_seed(0)
    m = CrossShapedAttention(16, 2, 2).eval()
    x = torch.randn(2, 6, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x.flatten(1, 2), hw=(6, 4)), m(x).flatten(1, 2))
    with pytest.raises(ValueError, match="hw"):
        m(x.flatten(1, 2))
    with pytest.raises(ValueError, match="branch"):
        CrossShapedAttention(16, 3, 2)


def test_block_residual_layer_scale_and_drop_path():
    torch.manual_seed(0)
    blk = CSWinBlock(16, 2, 2, drop_path=0.5, layer_scale=1e-5)
    x = torch.randn(4, 6, 6, 16, requires_grad=True)
    blk.eval()
    y = blk(x)
    assert y.shape == x.shape
    assert (y - x).abs().max() < 1e-3  # branches scaled by 1e-5 at init
    blk.train()
    blk(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in blk.parameters())
    plain = CSWinBlock(16, 2, 2)
    assert plain.ls1 is None and "ls1" not in dict(plain.named_parameters())
