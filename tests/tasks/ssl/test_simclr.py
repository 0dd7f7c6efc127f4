"""SimCLR: the NT-Xent loss against hand-computed values and lightly, the views, one training step."""
from __future__ import annotations

import math

import pytest
import torch

import keel
from keel.config import RunConfig
from keel.tasks.ssl import build_method, list_methods
from keel.tasks.ssl.base import Method
from keel.tasks.ssl.simclr import SimCLR, nt_xent


# ---------------------------------------------------------------- nt_xent
def _cos(a, b) -> float:
    return (a[0] * b[0] + a[1] * b[1]) / (math.hypot(*a) * math.hypot(*b))


def _nt_xent_by_hand(z1, z2, t: float) -> float:
    """The SimCLR loss written out: views v_0..v_{2N-1} = z1 then z2; the positive of v_i is the
    other view of the same image; the denominator runs over the 2N - 1 views other than v_i;
    the loss is the mean over all 2N anchors of -log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t))."""
    views = list(z1) + list(z2)
    n = len(z1)
    total = 0.0
    for i, v in enumerate(views):
        p = (i + n) % (2 * n)
        num = math.exp(_cos(v, views[p]) / t)
        den = sum(math.exp(_cos(v, views[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


def test_nt_xent_closed_form_for_aligned_orthogonal_views():
    # Two images, views identical, images orthogonal: every anchor sees its positive at cosine 1
    # and the two other views at cosine 0, so loss = -log(e^2 / (e^2 + 1 + 1)) = log(1 + 2 e^-2).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = math.log(1 + 2 * math.exp(-2.0))
    assert nt_xent(z, z.clone(), temperature=0.5).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.2395, abs=1e-4)


def test_nt_xent_matches_explicit_formula():
    # Unnormalized 2-D embeddings at various angles (nt_xent must normalize them itself).
    z1 = [(3.0, 4.0), (-1.0, 0.5)]
    z2 = [(1.0, 2.0), (0.2, -2.0)]
    for t in (0.5, 0.1, 1.0):
        expected = _nt_xent_by_hand(z1, z2, t)
        got = nt_xent(torch.tensor(z1), torch.tensor(z2), temperature=t).item()
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-6), t
    # Swapping the two views leaves the loss unchanged (it is symmetric in the views).
    a, b = torch.tensor(z1), torch.tensor(z2)
    assert nt_xent(a, b, 0.5).item() == pytest.approx(nt_xent(b, a, 0.5).item(), abs=1e-6)


def test_nt_xent_matches_lightly():
    loss_mod = pytest.importorskip("lightly.loss")
    g = torch.Generator().manual_seed(0)
    for n, d, t in [(8, 16, 0.5), (16, 4, 0.1), (5, 32, 0.2)]:
        z1 = torch.randn(n, d, generator=g)
        z2 = torch.randn(n, d, generator=g)
        ref = loss_mod.NTXentLoss(temperature=t, gather_distributed=False)(z1, z2)
        assert nt_xent(z1, z2, t).item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)


def test_nt_xent_gradient_matches_autograd_of_explicit_formula():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def reference(a, b, t):  # the same formula in torch ops, written without keel
        v = torch.cat([a, b])
        v = v / v.norm(dim=1, keepdim=True)
        s = torch.exp(v @ v.T / t)
        n = len(a)
        pos = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        den = s.sum(1) - s.diagonal()
        return -(torch.log(s[torch.arange(2 * n), pos] / den)).mean()

    ref = reference(z1, z2, 0.3)
    got = nt_xent(z1, z2, 0.3)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    ga = torch.autograd.grad(got, (z1, z2))
    gr = torch.autograd.grad(ref, (z1, z2))
    for a, b in zip(ga, gr):
        torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-5)


def test_aligned_separated_views_have_lower_loss_than_random():
    g = torch.Generator().manual_seed(0)
    n, d = 16, 32
    basis = torch.eye(d)[:n] * 5.0  # well separated (orthogonal) images, both views identical
    aligned = nt_xent(basis, basis.clone(), 0.2).item()
    random = nt_xent(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), 0.2).item()
    # each anchor: positive at cosine 1, the 2N - 2 other views at cosine 0
    assert aligned == pytest.approx(math.log(1 + (2 * n - 2) * math.exp(-1 / 0.2)), abs=1e-5)
    assert aligned < 0.2 < 0.5 * math.log(2 * n - 1) < random
    # With views that are random, the loss is close to log(2N - 1) at high temperature.
    hot = nt_xent(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), 100.0).item()
    assert hot == pytest.approx(math.log(2 * n - 1), abs=0.05)


def test_nt_xent_computes_in_float32_under_low_precision_inputs():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(6, 8, generator=g)
    z2 = torch.randn(6, 8, generator=g)
    loss = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(nt_xent(z1.bfloat16().float(), z2.bfloat16().float(), 0.2).item(), abs=1e-6)


# ---------------------------------------------------------------- the method
def _cfg(img_size: int = 16) -> RunConfig:
    cfg = RunConfig()
    cfg.data.img_size = img_size
    cfg.method.proj_hidden_dim = 32
    cfg.method.proj_dim = 16
    return cfg


def _tiny_backbone(kind: str, img_size: int = 16):
    if kind == "vit":
        return keel.create_model("vit_tiny_patch4_32", img_size=img_size, depth=1, dim=32, num_heads=2)
    return keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16))


def _images(n=6, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_registry_builds_simclr():
    assert "simclr" in list_methods()
    cfg = _cfg()
    m = build_method("simclr", _tiny_backbone("vit"), cfg)
    assert isinstance(m, SimCLR) and isinstance(m, Method)
    assert cfg.method.temperature is None and m.temperature == 0.2  # None = SimCLR's own default
    cfg.method.temperature = 0.5
    assert build_method("simclr", _tiny_backbone("vit"), cfg).temperature == 0.5
    with pytest.raises(ValueError, match="unknown method 'nosuch'.*simclr"):
        build_method("nosuch", _tiny_backbone("vit"), cfg)


def test_make_views_shapes_dtype_and_determinism():
    torch.manual_seed(0)
    m = SimCLR(_tiny_backbone("vit"), _cfg(img_size=16))
    images = _images(n=6, size=20)  # views are resized to data.img_size
    x1, x2 = m.make_views(images, torch.Generator().manual_seed(7))
    for x in (x1, x2):
        assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32
        assert torch.isfinite(x).all()
    assert not torch.allclose(x1, x2)  # two independent augmentations
    y1, y2 = m.make_views(images, torch.Generator().manual_seed(7))
    assert torch.equal(x1, y1) and torch.equal(x2, y2)  # same seed, same views
    z1, _ = m.make_views(images, torch.Generator().manual_seed(8))
    assert not torch.equal(x1, z1)
    assert torch.equal(images, _images(n=6, size=20))  # the input batch is not modified


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_training_step_gives_finite_loss_and_backbone_gradients(kind):
    torch.manual_seed(0)
    m = build_method("simclr", _tiny_backbone(kind), _cfg(img_size=16))
    m.train()
    views = m.make_views(_images(n=8, size=16), torch.Generator().manual_seed(0))
    out = m(views)  # forward == training_step
    loss = out["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert 0.0 < loss.item() < 2 * math.log(2 * 8 - 1)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    first = next(m.backbone.parameters())
    assert first.grad.abs().sum() > 0  # the gradient reaches the backbone's first layer
    assert sum(p.grad.abs().sum() for p in m.backbone.parameters()) > 0
    assert sum(p.grad.abs().sum() for p in m.projector.parameters()) > 0
