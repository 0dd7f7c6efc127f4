"""SimSiam: the loss against lightly's NegativeCosineSimilarity, the stop-gradient on a
hand-built case, the heads against lightly's, and one real training run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import keel
from keel.config import RunConfig
from keel.tasks.ssl import build_method
from keel.tasks.ssl.simsiam import SimSiam, simsiam_loss


def test_loss_matches_lightly_and_hand_values():
    loss_mod = pytest.importorskip("lightly.loss")
    ncs = loss_mod.NegativeCosineSimilarity()
    g = torch.Generator().manual_seed(0)
    for n, d in [(8, 16), (3, 4), (16, 128)]:
        p1, p2, z1, z2 = (torch.randn(n, d, generator=g) for _ in range(4))
        ref = (ncs(p1, z2) + ncs(p2, z1)) / 2
        assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(ref.item(), abs=1e-6)
    # by hand: cos(p1, z2) = 1 and cos(p2, z1) = 0 -> -(1 + 0) / 2
    p1, z2 = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    p2, z1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(-0.5, abs=1e-6)


def test_stop_gradient_on_a_hand_built_case():
    # z1, z2 are leaves; the predictor is a fixed linear map W, so p_i = z_i W. Each z then has
    # two paths into the loss: through its own prediction (cos(p1, z2) for z1) and as the target
    # of the other one (cos(p2, z1)). The stop-gradient keeps only the first.
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64)
    z1 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    g1, g2 = torch.autograd.grad(simsiam_loss(z1 @ W, z2 @ W, z1, z2), (z1, z2))
    # only through p: -cos(z1 W, const z2) / 2 for z1, and likewise for z2
    c1 = -F.cosine_similarity(z1 @ W, z2.detach(), dim=1).mean() / 2
    c2 = -F.cosine_similarity(z2 @ W, z1.detach(), dim=1).mean() / 2
    torch.testing.assert_close(g1.double(), torch.autograd.grad(c1, z1)[0])
    torch.testing.assert_close(g2.double(), torch.autograd.grad(c2, z2)[0])
    # the targets' own branch gets nothing: with the predictions held fixed, the loss does not
    # depend on z1, z2 at all (autograd sees no path to them)
    assert not simsiam_loss((z1 @ W).detach(), (z2 @ W).detach(), z1, z2).requires_grad
    # and without the stop-gradient the gradient would differ (the check above can fail)
    full = -(F.cosine_similarity(z1 @ W, z2, dim=1).mean() + F.cosine_similarity(z2 @ W, z1, dim=1).mean()) / 2
    assert not torch.allclose(torch.autograd.grad(full, z1)[0], g1.double())


def test_loss_is_float32_under_autocast():
    g = torch.Generator().manual_seed(2)
    t = [torch.randn(8, 16, generator=g) for _ in range(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = simsiam_loss(*(x.bfloat16() for x in t))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(simsiam_loss(*(x.bfloat16().float() for x in t)).item(), abs=1e-6)


def _cfg() -> RunConfig:
    cfg = RunConfig()
    cfg.data.img_size = 16
    cfg.method.proj_hidden_dim = 32
    cfg.method.proj_dim = 16
    cfg.method.pred_hidden_dim = 8
    return cfg


def _vit():
    return keel.create_model("vit_tiny_patch4_32", img_size=16, depth=1, dim=32, num_heads=2)


def test_defaults_and_heads_match_lightlys():
    heads = pytest.importorskip("lightly.models.modules.heads")
    with torch.device("meta"):
        m = SimSiam(_vit(), RunConfig())
    assert [(x.in_features, x.out_features) for x in m.projector if isinstance(x, nn.Linear)] == \
        [(32, 2048), (2048, 2048), (2048, 2048)]
    assert [(x.in_features, x.out_features) for x in m.predictor if isinstance(x, nn.Linear)] == \
        [(2048, 512), (512, 2048)]
    assert isinstance(m.projector[-1], nn.BatchNorm1d) and not m.projector[-1].affine  # BN on the output
    assert not isinstance(m.predictor[-1], nn.BatchNorm1d)                             # none on the predictor's
    torch.manual_seed(0)
    m = build_method("simsiam", _vit(), _cfg())
    for ours, theirs in ((m.projector, heads.SimSiamProjectionHead(32, 32, 16)),
                         (m.predictor, heads.SimSiamPredictionHead(16, 8, 16))):
        theirs_sd = theirs.state_dict()
        assert [v.shape for v in ours.state_dict().values()] == [v.shape for v in theirs_sd.values()]
        ours.load_state_dict(dict(zip(ours.state_dict(), theirs_sd.values())))
        x = torch.randn(6, ours[0].in_features)
        torch.testing.assert_close(ours(x), theirs(x))


def test_training_step_matches_its_parts_and_trains_every_parameter():
    torch.manual_seed(0)
    m = SimSiam(_vit(), _cfg())
    m.train()
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    loss = m((x1, x2))["loss"]
    with torch.no_grad():
        z1, z2 = m.projector(m.backbone.embed(x1)), m.projector(m.backbone.embed(x2))
        ncs = -(F.cosine_similarity(m.predictor(z1), z2).mean() + F.cosine_similarity(m.predictor(z2), z1).mean()) / 2
    assert loss.item() == pytest.approx(ncs.item(), abs=1e-6)
    assert -1.0 <= loss.item() <= 1.0
    loss.backward()
    for name, p in m.named_parameters():  # DDP: no parameter unused
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_pretrain_smoke(make_cfg, tmp_path):
    from keel.jobs.pretrain import pretrain
    cfg = make_cfg("method.name=simsiam", "train.max_steps=2", "method.proj_hidden_dim=32",
                   "method.proj_dim=16", "method.pred_hidden_dim=8")
    result = pretrain(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result["steps"] == 2 and math.isfinite(result["loss"]) and -1 <= result["loss"] <= 1
    assert (tmp_path / "run" / "backbone.safetensors").is_file()
