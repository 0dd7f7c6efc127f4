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


def official_count(embed: int, depths: tuple[int, ...], num_classes: int = 1000) -> int:
    """Parameters of the official CSWin code's layer list (microsoft/CSWin-Transformer,
    models/cswin.py), counted by hand. A block of width d: norm1 and norm2 (2d each), qkv with
    bias (3d^2 + 3d), proj (d^2 + d), MLP 4x (8d^2 + 5d), and the LePE depth-wise 3x3 convs on V
    (10d in all: two d/2-wide branches, or one d-wide in the last stage) = 12d^2 + 23d."""
    dims = [embed * 2 ** i for i in range(4)]
    blocks = sum(n * (12 * d * d + 23 * d) for n, d in zip(depths, dims))
    stem = 3 * embed * 49 + embed + 2 * embed                      # 7x7 stride-4 conv + LayerNorm
    merges = sum(9 * a * b + b + 2 * b for a, b in zip(dims[:-1], dims[1:]))  # 3x3 conv + LN
    return blocks + stem + merges + 2 * dims[-1] + dims[-1] * num_classes + num_classes


@pytest.mark.parametrize("name, embed, depths, paper", [
    ("cswin_tiny", 64, (1, 2, 21, 1), 23e6),
    ("cswin_small", 64, (2, 4, 32, 2), 35e6),
    ("cswin_base", 96, (2, 4, 32, 2), 78e6),
])
def test_parameter_count(name, embed, depths, paper):
    with torch.device("meta"):
        m = keel.create_model(name, num_classes=1000)
    assert n_params(m) == official_count(embed, depths)
    # The paper reports 23 / 35 / 78M; the official code itself has 22.32 / 34.64 / 77.38M.
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
