import math

import pytest
import torch

from keel.models.layers.init import trunc_normal_


def _draw(fn, seed: int = 0, shape=(64, 48), **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    return fn(torch.empty(shape), **kw)


def test_same_values_as_timm_from_the_same_seed():
    # timm, lightly and the official DINO/MAE code all draw by the inverse CDF: a keel model and
    # a reference model of the same seed start from the same weights, whatever PyTorch draws
    timm_layers = pytest.importorskip("timm.layers")
    for kw in (dict(std=0.02), dict(std=1.0, a=-1.0, b=1.5), dict(mean=0.3, std=0.5, a=-0.2, b=1.0)):
        ours = _draw(trunc_normal_, **kw)
        ref = _draw(timm_layers.trunc_normal_, **kw)
        assert torch.equal(ours, ref), kw


def test_same_values_as_lightly_from_the_same_seed():
    utils = pytest.importorskip("lightly.models.utils")
    ours = _draw(trunc_normal_, seed=3, std=0.02)
    ref = _draw(lambda t, std: utils._no_grad_trunc_normal(t, mean=0.0, std=std, a=-2.0, b=2.0), seed=3, std=0.02)
    assert torch.equal(ours, ref)


def test_generator_is_used_and_global_state_left_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = trunc_normal_(torch.empty(100), generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = trunc_normal_(torch.empty(100), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_truncated_normal_moments_and_bounds():
    # N(0, 1) truncated to [-1, 1]: variance 1 - 2 beta phi(beta) / (2 Phi(beta) - 1) at beta = 1
    x = trunc_normal_(torch.empty(400_000, dtype=torch.float64), std=1.0, a=-1.0, b=1.0,
                      generator=torch.Generator().manual_seed(0))
    assert x.min() >= -1.0 and x.max() <= 1.0
    phi = math.exp(-0.5) / math.sqrt(2 * math.pi)
    var = 1 - 2 * phi / math.erf(1 / math.sqrt(2))
    assert x.std().item() == pytest.approx(math.sqrt(var), abs=3e-3)  # 0.5396
    assert x.mean().item() == pytest.approx(0.0, abs=3e-3)
    # far bounds (the models' std 0.02 with a, b = -2, 2): a plain normal, finite everywhere
    y = trunc_normal_(torch.empty(400_000), std=0.02, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(y).all() and y.std().item() == pytest.approx(0.02, rel=1e-2)
