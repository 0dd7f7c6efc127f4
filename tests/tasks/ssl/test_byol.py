"""BYOL: the loss against lightly's NegativeCosineSimilarity and the formula, the heads against
lightly's, the EMA target (exact update, no gradient), and one real training run."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import keel
from keel.config import RunConfig
from keel.tasks.ssl import build_method
from keel.tasks.ssl.byol import BYOL, regression_loss


# ---------------------------------------------------------------- the loss
def test_regression_loss_is_two_minus_two_cos_and_the_normalized_squared_error():
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[6.0, 8.0], [-2.0, 0.0], [5.0, 0.0]])  # cos = 1, -1, 0
    assert regression_loss(p, z).item() == pytest.approx((0.0 + 4.0 + 2.0) / 3, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    mse = ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1).mean()
    assert regression_loss(p, z).item() == pytest.approx(mse.item(), abs=1e-6)


def test_symmetrized_loss_matches_lightly():
    loss_mod = pytest.importorskip("lightly.loss")
    ncs = loss_mod.NegativeCosineSimilarity()  # -mean cos
    g = torch.Generator().manual_seed(1)
    for n, d in [(8, 16), (3, 4), (16, 256)]:
        p1, p2, z1, z2 = (torch.randn(n, d, generator=g) for _ in range(4))
        ours = regression_loss(p1, z2) + regression_loss(p2, z1)  # what BYOL reports: L + L~
        ref = 4 + 2 * (ncs(p1, z2) + ncs(p2, z1))
        assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


def test_target_gets_no_gradient_and_prediction_gets_the_right_one():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gp, gz = torch.autograd.grad(regression_loss(p, z), (p, z), allow_unused=True)
    assert gz is None
    ref = (2 - 2 * (p * z.detach()).sum(1) / (p.norm(dim=1) * z.detach().norm(dim=1))).mean()
    torch.testing.assert_close(gp.double(), torch.autograd.grad(ref, p)[0], atol=1e-6, rtol=1e-5)


def test_loss_is_float32_under_autocast():
    g = torch.Generator().manual_seed(3)
    p, z = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = regression_loss(p.bfloat16(), z.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(regression_loss(p.bfloat16().float(), z.bfloat16().float()).item(), abs=1e-6)


# ---------------------------------------------------------------- the method
def _cfg(img_size: int = 16) -> RunConfig:
    cfg = RunConfig()
    cfg.data.img_size = img_size
    cfg.method.proj_hidden_dim = 32
    cfg.method.proj_dim = 16
    cfg.method.pred_hidden_dim = 24
    return cfg


def _vit():
    return keel.create_model("vit_tiny_patch4_32", img_size=16, depth=1, dim=32, num_heads=2)


def _resnet():
    return keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16))


def test_defaults_and_heads_match_lightlys():
    heads = pytest.importorskip("lightly.models.modules.heads")
    with torch.device("meta"):
        m = BYOL(_vit(), RunConfig())
    assert m.base_momentum == 0.996
    def widths(head):
        return [(x.in_features, x.out_features) for x in head if isinstance(x, nn.Linear)]
    assert widths(m.projector) == [(32, 4096), (4096, 256)]
    assert widths(m.predictor) == [(256, 4096), (4096, 256)]
    # same layers as lightly's BYOL heads: load lightly's weights, get the same outputs
    torch.manual_seed(0)
    m = BYOL(_vit(), _cfg())
    for ours, theirs in ((m.projector, heads.BYOLProjectionHead(32, 32, 16)),
                         (m.predictor, heads.BYOLPredictionHead(16, 24, 16))):
        theirs_sd = theirs.state_dict()
        assert [v.shape for v in ours.state_dict().values()] == [v.shape for v in theirs_sd.values()]
        ours.load_state_dict(dict(zip(ours.state_dict(), theirs_sd.values())))
        x = torch.randn(6, ours[0].in_features)
        torch.testing.assert_close(ours(x), theirs(x))
    cfg = _cfg()
    cfg.method.momentum = 0.99
    assert build_method("byol", _vit(), cfg).base_momentum == 0.99


def test_training_step_at_init_and_which_parameters_train():
    # The target starts equal to the online network: the loss is the online network's own
    # predictions against its projections of the other view.
    torch.manual_seed(0)
    m = BYOL(_vit(), _cfg())
    m.train()
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    loss = m((x1, x2))["loss"]
    with torch.no_grad():
        z1, z2 = m.projector(m.backbone.embed(x1)), m.projector(m.backbone.embed(x2))
        ref = regression_loss(m.predictor(z1), z2) + regression_loss(m.predictor(z2), z1)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert 0.0 <= loss.item() <= 8.0
    loss.backward()
    for name, p in m.named_parameters():
        if name.startswith("target_"):
            assert not p.requires_grad and p.grad is None, name  # no gradient reaches the target
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name  # DDP: none unused
    assert m.backbone.patch_embed.proj.weight.grad.abs().sum() > 0  # BYOL freezes nothing


def test_ema_update_is_exact_and_follows_the_cosine(check_ema):
    torch.manual_seed(0)
    m = BYOL(_resnet(), _cfg())
    step, total = 3, 10
    tau = 1 - (1 - 0.996) * (math.cos(math.pi * step / total) + 1) / 2  # BYOL's tau_k
    assert m.momentum_at(step, total) == pytest.approx(tau, abs=1e-12)
    old, new = check_ema(m, [("target_backbone.", "backbone."), ("target_projector.", "projector.")], tau, step, total)
    for name in old:  # the online network and the predictor are untouched
        if not name.startswith("target_"):
            assert torch.equal(new[name], old[name]), name
    utils = pytest.importorskip("lightly.models.utils")
    ref = BYOL(_resnet(), _cfg())
    ref.load_state_dict(old)
    utils.update_momentum(ref.projector, ref.target_projector, tau)
    for a, b in zip(m.target_projector.parameters(), ref.target_projector.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    before = [p.clone() for p in m.target_backbone.parameters()]
    m.on_step_end(total, total)  # tau = 1 at the end
    assert all(torch.equal(a, b) for a, b in zip(before, m.target_backbone.parameters()))


def test_pretrain_smoke(make_cfg, tmp_path):
    from keel.jobs.pretrain import pretrain
    cfg = make_cfg("method.name=byol", "train.max_steps=2", "method.proj_hidden_dim=32",
                   "method.proj_dim=16", "method.pred_hidden_dim=32")
    result = pretrain(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result["steps"] == 2 and math.isfinite(result["loss"]) and 0 <= result["loss"] <= 8
    assert (tmp_path / "run" / "backbone.safetensors").is_file()
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if s]
    assert [rec["step"] for rec in lines] == [1, 2]
