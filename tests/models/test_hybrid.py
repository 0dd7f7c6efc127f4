"""The seeds' hybrid backbone: budgets, feature maps, every attention / position option."""
from __future__ import annotations

import pytest
import torch

import keel
from keel.models.stats import model_stats

TINY = dict(widths=(16, 32, 64, 128), depths=(1, 2, 2, 1), head_dim=16, window=2, split_size=2, img_size=64)


@pytest.mark.parametrize("name, max_params, max_gmacs", [
    ("keel_tiny", 28.3, 4.5), ("keel_small", 49.6, 8.7), ("keel_base", 87.8, 15.4)])
def test_within_swin_budgets(name, max_params, max_gmacs):
    st = model_stats(name, num_classes=1000)
    assert st["params_m"] <= max_params and st["gmacs"] <= max_gmacs
    # and not trivially small: at least 75% of Swin's parameter budget
    assert st["params_m"] >= 0.75 * max_params * (0.8 if name == "keel_tiny" else 1.0)


def test_feature_maps_match_feature_info_at_several_sizes():
    with torch.device("meta"):
        m = keel.create_model("keel_tiny")
        for size in (224, 256, 160):
            maps = m.feature_maps(torch.empty(1, 3, size, size))
            assert [(t.shape[1], size // t.shape[2]) for t in maps] == \
                   [(f["channels"], f["stride"]) for f in m.feature_info]
            assert [f["stride"] for f in m.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize("attention, pos", [
    (("shifted_window_conv", "global"), "rel_bias"),
    (("shifted_window_conv", "global"), "lepe"),
    (("cross_shaped", "cross_shaped"), "lepe"),
    ("global", "rel_bias"),
])
def test_every_attention_and_position_option_trains(attention, pos):
    torch.manual_seed(0)
    m = keel.create_model("keel_tiny", num_classes=5, attention=attention, pos=pos, drop_path_rate=0.1, **TINY)
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
    # sizes other than the built one: a multiple of the total stride that needs window padding
    m.eval()
    assert m.embed(torch.randn(1, 3, 96, 96)).shape == (1, m.num_features)


def test_options_change_the_blocks_they_should():
    sw = keel.create_model("keel_tiny", **TINY)
    cs = keel.create_model("keel_tiny", attention="cross_shaped", pos="lepe", **TINY)
    kinds = lambda m: {type(b).__name__ for st in m.stages[2:] for b in st.blocks}  # noqa: E731
    assert kinds(sw) == {"SwinBlock"} and kinds(cs) == {"CSWinBlock"}
    blk = sw.stages[2].blocks[1]
    assert blk.dwconv is not None and blk.dwconv.groups == blk.dwconv.in_channels   # conv + attention
    assert blk.shift != (0, 0) and sw.stages[2].blocks[0].shift == (0, 0)          # shifted on odd blocks
    # early stages are convolutional (EfficientNetV2-like)
    assert type(sw.stages[0][0]).__name__ == "FusedMBConv" and type(sw.stages[1][0]).__name__ == "MBConv"


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="cross_shaped"):
        keel.create_model("keel_tiny", attention="cross_shaped", pos="rel_bias", **TINY)
    with pytest.raises(ValueError, match="unknown attention"):
        keel.create_model("keel_tiny", attention="halo", **TINY)
    with pytest.raises(ValueError, match="unknown pos"):
        keel.create_model("keel_tiny", pos="sinusoid", **TINY)


def test_eval_output_independent_of_batch_composition():
    """No information leaks between images (BN in eval mode, attention within an image)."""
    torch.manual_seed(0)
    m = keel.create_model("keel_tiny", **TINY).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.embed(x)[:1], m.embed(x[:1]), rtol=1e-5, atol=1e-5)
