"""Checks shared by the methods with momentum (EMA) networks."""
from __future__ import annotations

import pytest
import torch


def _check_ema(m, pairs: list[tuple[str, str]], momentum: float, step: int, total: int):
    """Move the online BN statistics and weights of ``m``, call ``on_step_end(step, total)``, and
    check that each target network (prefix, online prefix) became momentum * target + (1 -
    momentum) * online, with buffers copied. Returns the state dicts (before, after)."""
    m.train()
    m((torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)))  # moves the online BN statistics
    with torch.no_grad():
        for _, online in pairs:
            for p in getattr(m, online[:-1]).parameters():
                p.add_(torch.randn_like(p))
    old = {k: v.clone() for k, v in m.state_dict().items()}
    m.on_step_end(step, total)
    new = m.state_dict()
    for prefix, online in pairs:
        for name, _ in getattr(m, prefix[:-1]).named_parameters():
            expected = momentum * old[prefix + name] + (1 - momentum) * old[online + name]
            torch.testing.assert_close(new[prefix + name], expected, atol=1e-6, rtol=1e-6, msg=name)
            assert not torch.equal(new[prefix + name], old[prefix + name]), name
        for name, _ in getattr(m, prefix[:-1]).named_buffers():  # BN statistics are copied
            assert torch.equal(new[prefix + name], old[online + name]), name
    return old, new


@pytest.fixture
def check_ema():
    """``check_ema(method, [(target prefix, online prefix), ...], momentum, step, total)``."""
    return _check_ema
