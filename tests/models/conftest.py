"""Checks every backbone family shares, offered as fixtures (tests import no helper modules)."""
from __future__ import annotations

import pytest
import torch


def _feature_maps_match_info(m, x: torch.Tensor) -> list[torch.Tensor]:
    """feature_maps(x) has one map per feature_info entry, with its channels and stride."""
    batch, _, h, w = x.shape
    with torch.no_grad():
        maps = m.feature_maps(x)
    assert len(maps) == len(m.feature_info)
    for fm, info in zip(maps, m.feature_info):
        assert fm.shape == (batch, info["channels"], h // info["stride"], w // info["stride"])
    return maps


def _drop_path_only_in_training(m, plain, x) -> None:
    """``m`` has drop-path, ``plain`` the same weights without: equal in eval, random in train."""
    m.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x))   # eval: drop-path is the identity
        m.train(), plain.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        b = m(x)
        assert not torch.allclose(a, b)              # train: random per-sample drops
        torch.manual_seed(1)
        torch.testing.assert_close(m(x), a)          # ... drawn from the global generator


@pytest.fixture
def feature_maps_match_info():
    return _feature_maps_match_info


@pytest.fixture
def drop_path_only_in_training():
    return _drop_path_only_in_training
