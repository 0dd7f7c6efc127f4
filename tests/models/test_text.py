"""The caption tokenizer (HF tokenizers BPE) and CLIP's causal text tower."""
from __future__ import annotations

import pytest
import torch

from keel.models.text import CaptionTokenizer, create_text_model, list_text_models

CAPTIONS = ["a photo of a red shirt", "a blue shirt on a table", "a pair of sneakers",
            "red sneakers", "an ankle boot", "a photo of a bag"] * 5


def test_tokenizer_round_trip_special_tokens_and_file(tmp_path):
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=300, context_length=12)
    ids = tok.encode(["a photo of a red shirt", "red sneakers"])
    assert ids.shape == (2, 12) and ids.dtype == torch.int64
    assert ids[0, 0] == tok.sot_id == 1 and tok.pad_id == 0 and tok.eot_id == 2
    n = int((ids[1] != 0).sum())
    assert ids[1, n - 1] == tok.eot_id and (ids[1, n:] == 0).all()
    assert tok.decode(ids[0]) == "a photo of a red shirt"
    assert tok.decode(tok.encode("RED Sneakers")[0]) == "red sneakers"     # lower-cased
    # an over-long caption is cut but keeps its end-of-text token
    long = tok.encode(" ".join(["red shirt"] * 40))[0]
    assert long[-1] == tok.eot_id and (long != 0).all()
    tok.save(tmp_path / "tokenizer.json")
    back = CaptionTokenizer.load(tmp_path / "tokenizer.json")
    assert back.context_length == 12
    assert torch.equal(back.encode(CAPTIONS[:6]), tok.encode(CAPTIONS[:6]))


def test_text_tower_is_causal_and_pools_at_end_of_text():
    torch.manual_seed(0)
    m = create_text_model("text_tiny", vocab_size=50, embed_dim=16).eval()
    a = torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0]])
    # padding after <eot> can hold anything: the causal mask keeps it from the pooled feature
    b = torch.tensor([[1, 5, 6, 2, 7, 8, 9, 2]])
    b_pad = b.clone()
    b_pad[0, 4:] = 0
    out_a = m(a)
    assert out_a.shape == (1, 16)
    torch.testing.assert_close(m(torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0]])), out_a)
    # a different earlier token changes the feature; the pooled position is the last non-pad one
    assert not torch.allclose(m(torch.tensor([[1, 9, 6, 2, 0, 0, 0, 0]])), out_a)
    assert not torch.allclose(m(b), out_a)              # b's last non-pad token is position 7
    torch.testing.assert_close(m(b_pad), out_a)


def test_text_tower_matches_a_hand_written_reference():
    """The block written out with nn.MultiheadAttention and an explicit causal mask."""
    torch.manual_seed(0)
    m = create_text_model("text_tiny", vocab_size=40, embed_dim=8, layers=1).eval()
    tokens = torch.tensor([[1, 4, 5, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
    blk = m.blocks[0]
    mha = torch.nn.MultiheadAttention(64, 2, batch_first=True)
    mha.in_proj_weight.data.copy_(blk.qkv.weight)
    mha.in_proj_bias.data.copy_(blk.qkv.bias)
    mha.out_proj.weight.data.copy_(blk.proj.weight)
    mha.out_proj.bias.data.copy_(blk.proj.bias)
    x = m.token_embedding(tokens) + m.positional_embedding[:6]
    mask = torch.triu(torch.full((6, 6), float("-inf")), 1)
    h = blk.ln_1(x)
    x = x + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
    x = x + blk.mlp(blk.ln_2(x))
    x = m.ln_final(x)
    want = m.text_projection(x[[0, 1], [3, 2]])
    torch.testing.assert_close(m(tokens), want, atol=1e-5, rtol=1e-5)


def test_sizes_by_name():
    assert {"text_tiny", "text_small", "text_base"} <= set(list_text_models())
    with torch.device("meta"):
        base = create_text_model("text_base", vocab_size=49408)
    assert (base.cfg.width, base.cfg.layers, base.cfg.heads, base.cfg.context_length) == (512, 12, 8, 77)
    n = sum(p.numel() for p in base.parameters())
    assert 60e6 < n < 66e6     # CLIP's text tower: 63M
    with pytest.raises(ValueError, match="unknown text model"):
        create_text_model("text_huge")
    with pytest.raises(ValueError, match="option"):
        create_text_model("text_tiny", depth=3)
