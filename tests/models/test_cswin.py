"""CSWin: registry, parameter counts, feature maps at strides 4-32, any size, training."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import keel
import keel.models.cswin  # noqa: F401  (registers the builders)
from keel.models.cswin import CSWin, CSWinConfig


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def small(**kw):
    args = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4))
    args.update(kw)
    return keel.create_model("cswin_tiny", **args)


@pytest.mark.parametrize("name, exact, paper", [
    # exact counts of the official code's architecture; the paper rounds T and B up (23 / 78M)
    ("cswin_tiny", 22_320_552, 23e6),
    ("cswin_small", 34_643_304, 35e6),
    ("cswin_base", 77_382_184, 78e6),
])
def test_parameter_count(name, exact, paper):
    with torch.device("meta"):
        m = keel.create_model(name, num_classes=1000)
    assert n_params(m) == exact
    assert abs(n_params(m) - paper) < 0.7e6


def test_registry_and_config():
    assert {"cswin_tiny", "cswin_small", "cswin_base"} <= set(keel.list_models("cswin"))
    with torch.device("meta"):
        m = keel.create_model("cswin_base", depths=(1, 1, 1, 1))
    assert isinstance(m, CSWin) and isinstance(m.head, nn.Identity)
    assert m.cfg == CSWinConfig(embed_dim=96, depths=(1, 1, 1, 1), num_heads=(4, 8, 16, 32))
    assert m.num_features == 768
    assert [len(s.blocks) for s in m.stages] == [1, 1, 1, 1]
    # the last stage attends globally with one branch; the others use two
    assert [s.blocks[0].attn.branches for s in m.stages] == [2, 2, 2, 1]


@pytest.mark.parametrize("size", [224, 256])
def test_feature_info_matches_feature_maps(size):
    torch.manual_seed(0)
    m = keel.create_model("cswin_tiny", depths=(1, 1, 1, 1)).eval()
    assert [f["stride"] for f in m.feature_info] == [4, 8, 16, 32]
    with torch.no_grad():
        maps = m.feature_maps(torch.randn(1, 3, size, size))
    assert [tuple(f.shape) for f in maps] == [
        (1, f["channels"], size // f["stride"], size // f["stride"]) for f in m.feature_info]


def test_embed_forward_head_and_odd_sizes():
    torch.manual_seed(0)
    m = small(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        e = m.embed(x)
        assert e.shape == (2, 128) and m.num_features == 128
        torch.testing.assert_close(m(x), m.head(e))
        maps = m.feature_maps(x)
        torch.testing.assert_close(e, m.norm(maps[-1].permute(0, 2, 3, 1)).mean((1, 2)))
        # 160 px: stage 3 is 10x10 with stripes of 7 (padded + masked); 96x64: non-square
        for shape in [(1, 3, 160, 160), (1, 3, 96, 64)]:
            out = m.feature_maps(torch.randn(shape))
            assert [o.shape[-2:] for o in out] == [(shape[2] // s, shape[3] // s) for s in (4, 8, 16, 32)]


def test_train_step_with_drop_path():
    torch.manual_seed(0)
    m = small(num_classes=3, drop_path_rate=0.3, layer_scale=0.1).train()
    rates = [b.drop_path.p for s in m.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    x = torch.randn(2, 3, 64, 64)
    loss = nn.functional.cross_entropy(m(x), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)  # stochastic depth is on in training
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_no_timm_conversion():
    assert not hasattr(keel.models.cswin, "from_timm_state_dict")
