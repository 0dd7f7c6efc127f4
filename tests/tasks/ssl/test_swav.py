"""SwAV: Sinkhorn and the swapped-prediction loss against hand-computed values and lightly, the
method (multi-crop, float32 scores, prototypes on the sphere and frozen at first, the queue),
2 gloo processes against 1, and one run of the real trainer.

The 2-process checks run this file as a script (see tests/conftest.py ``launch``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import keel
from keel.config import ConfigError, RunConfig
from keel.engine import distributed as D
from keel.tasks.ssl import build_method, list_methods
from keel.tasks.ssl.swav import SwAV, sinkhorn, swav_loss

WORLD = 2
BATCH = 8  # images in the combined batch of the 2-process checks; each rank holds BATCH // WORLD


# ---------------------------------------------------------------- helpers
def _cfg(img_size: int = 16, local_crops: int = 2, prototypes: int = 10, **method) -> RunConfig:
    cfg = RunConfig()
    cfg.data.img_size = img_size
    cfg.aug.local_crops = local_crops
    cfg.method.name = "swav"
    cfg.method.proj_hidden_dim = 32
    cfg.method.proj_dim = 16
    cfg.method.num_prototypes = prototypes
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg


def _vit(img_size: int = 16):
    return keel.create_model("vit_tiny_patch4_32", img_size=img_size, depth=1, dim=32, num_heads=2)


def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _bn_eval(module: nn.Module) -> None:
    # BatchNorm in eval mode is a fixed per-sample map: a sample's projection then does not depend
    # on which other samples share its batch (the projector's BN would otherwise see half the
    # batch per process, with no SyncBN on CPU). Done identically in every run compared.
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = len(x) // world
    return x[rank * n:(rank + 1) * n]


def _cosine_scores(n, k, d=8, seed=0):
    """Scores as SwAV makes them: cosines of unit features with unit prototypes."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1) @ F.normalize(torch.randn(k, d, generator=g), dim=1).T


def _sinkhorn_by_hand(scores: list[list[float]], iters: int, eps: float) -> list[list[float]]:
    """The paper's algorithm in plain Python: P = exp(S / eps) / sum, then alternately scale each
    prototype's total to 1/K and each sample's to 1/B; codes = B * P (one row per sample)."""
    b, k = len(scores), len(scores[0])
    p = [[math.exp(s / eps) for s in row] for row in scores]
    total = sum(map(sum, p))
    p = [[x / total for x in row] for row in p]
    for _ in range(iters):
        col = [sum(p[j][c] for j in range(b)) for c in range(k)]          # prototype totals
        p = [[p[j][c] / col[c] / k for c in range(k)] for j in range(b)]
        p = [[x / sum(row) / b for x in row] for row in p]                 # sample totals
    return [[x * b for x in row] for row in p]


# ---------------------------------------------------------------- sinkhorn
def test_sinkhorn_rows_sum_to_one_and_prototypes_get_equal_shares():
    for n, k in [(16, 10), (5, 12), (40, 4)]:
        s = _cosine_scores(n, k, seed=n)
        q = sinkhorn(s, iters=3, eps=0.05)
        assert q.shape == (n, k) and q.dtype == torch.float32 and (q >= 0).all()
        torch.testing.assert_close(q.sum(1), torch.ones(n), atol=1e-5, rtol=0)
        # Converged, the prototype marginals are equal too: each prototype gets B / K samples.
        q = sinkhorn(s, iters=300, eps=0.05)
        torch.testing.assert_close(q.sum(0), torch.full((k,), n / k), atol=1e-3 * n / k, rtol=0)
        torch.testing.assert_close(q.sum(1), torch.ones(n), atol=1e-5, rtol=0)
    # Every iteration evens the shares out further, starting from a plain softmax's.
    s = _cosine_scores(64, 8, seed=3) + torch.linspace(0, 0.3, 8)  # a bias towards the last prototypes
    spread = [(F.softmax(s / 0.05, dim=1).sum(0) - 8).abs().max()]
    spread += [(sinkhorn(s, iters).sum(0) - 8).abs().max() for iters in (1, 3, 10, 30)]
    assert all(a > b for a, b in zip(spread, spread[1:])) and spread[-1] < 0.01 * spread[0]


def test_sinkhorn_matches_hand_computed_case():
    s = [[0.9, -0.1, 0.3], [0.2, 0.5, -0.4]]
    for iters, eps in [(1, 0.5), (3, 0.3), (3, 0.05)]:
        expected = torch.tensor(_sinkhorn_by_hand(s, iters, eps))
        torch.testing.assert_close(sinkhorn(torch.tensor(s), iters, eps), expected, atol=1e-6, rtol=1e-5)
    # Two samples mirror each other over two prototypes: the prototype marginals are already
    # equal, so the codes are just softmax(scores / eps) row by row.
    a, b, eps = 0.6, -0.2, 0.5
    q = sinkhorn(torch.tensor([[a, b], [b, a]]), iters=3, eps=eps)
    p = 1 / (1 + math.exp((b - a) / eps))
    torch.testing.assert_close(q, torch.tensor([[p, 1 - p], [1 - p, p]]), atol=1e-6, rtol=0)


def test_sinkhorn_matches_lightly():
    swav_mod = pytest.importorskip("lightly.loss.swav_loss")
    for n, k, iters, eps in [(16, 10, 3, 0.05), (7, 30, 3, 0.05), (64, 16, 5, 0.1), (12, 12, 1, 0.05)]:
        s = _cosine_scores(n, k, seed=k)
        ref = swav_mod.sinkhorn(s, iterations=iters, epsilon=eps)
        torch.testing.assert_close(sinkhorn(s, iters, eps), ref, atol=1e-5, rtol=1e-5)


def test_sinkhorn_is_float32_without_gradient_and_leaves_input_alone():
    s = _cosine_scores(6, 5).requires_grad_(True)
    before = s.detach().clone()
    q = sinkhorn(s.bfloat16())
    assert q.dtype == torch.float32 and not q.requires_grad
    torch.testing.assert_close(q, sinkhorn(s.detach().bfloat16().float()), atol=0, rtol=0)
    assert torch.equal(s.detach(), before)


# ---------------------------------------------------------------- the loss
def test_swav_loss_one_term_by_hand():
    # One global crop whose two images mirror each other (codes = softmax(s / eps), see above)
    # and one local crop: the loss is that single term, -1/2 sum_j sum_k q_jk log softmax(t_j / T)_k.
    a, b, eps, temp = 0.6, -0.2, 0.5, 0.5
    t = [[0.3, 0.1], [0.0, 0.5]]
    p = 1 / (1 + math.exp((b - a) / eps))
    q = [[p, 1 - p], [1 - p, p]]

    def log_softmax(row):
        m = math.log(sum(math.exp(x / temp) for x in row))
        return [x / temp - m for x in row]

    expected = -sum(q[j][c] * log_softmax(t[j])[c] for j in range(2) for c in range(2)) / 2
    loss, codes = swav_loss([torch.tensor([[a, b], [b, a]])], [torch.tensor(t)], temp, iters=3, eps=eps)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.5307, abs=1e-4)
    torch.testing.assert_close(codes[0], torch.tensor(q), atol=1e-6, rtol=0)


def test_swav_loss_matches_lightly():
    loss_mod = pytest.importorskip("lightly.loss")
    ref_fn = loss_mod.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    for n, k, n_local, seed in [(8, 10, 0, 0), (8, 10, 2, 1), (5, 30, 6, 2)]:
        crops = [_cosine_scores(n, k, seed=seed * 10 + v) for v in range(2 + n_local)]
        high, low = crops[:2], crops[2:]
        loss, codes = swav_loss(high, low, temperature=0.1, iters=3, eps=0.05)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert loss.item() == pytest.approx(ref_fn(high, low).item(), abs=1e-5)
        torch.testing.assert_close(codes[1], sinkhorn(high[1]), atol=0, rtol=0)
        # with a queue: lightly appends the queue's scores after the batch, we put them first;
        # the codes of a sample do not depend on its position
        queue = [_cosine_scores(3 * n, k, seed=seed * 10 + 9 + i) for i in range(2)]
        with_q, _ = swav_loss(high, low, 0.1, 3, 0.05, queue_scores=queue)
        assert with_q.item() == pytest.approx(ref_fn(high, low, queue).item(), abs=1e-5)
        assert abs(with_q.item() - loss.item()) > 1e-4  # the queue does change the codes



def test_swav_loss_with_bias_matches_lightly_on_biased_scores():
    # lightly's prototypes have a bias and its Sinkhorn sees the biased scores; keel's codes come
    # from the cosines alone. Equal losses show the bias cancels in Sinkhorn, as claimed.
    loss_mod = pytest.importorskip("lightly.loss")
    ref_fn = loss_mod.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    n, k = 8, 10
    bias = torch.linspace(-0.3, 0.3, k)
    crops = [_cosine_scores(n, k, seed=40 + v) for v in range(4)]
    loss, codes = swav_loss(crops[:2], crops[2:], 0.1, 3, 0.05, bias=bias)
    assert loss.item() == pytest.approx(ref_fn([c + bias for c in crops[:2]], [c + bias for c in crops[2:]]).item(),
                                        abs=1e-5)
    torch.testing.assert_close(codes[0], sinkhorn(crops[0] + bias), atol=1e-5, rtol=0)
    assert abs(loss.item() - swav_loss(crops[:2], crops[2:], 0.1, 3, 0.05)[0].item()) > 1e-3  # it does act


def test_prototype_bias_scores_match_lightlys_prototypes():
    modules = pytest.importorskip("lightly.models.modules")
    loss_mod = pytest.importorskip("lightly.loss")
    torch.manual_seed(0)
    m = SwAV(_vit(), _cfg(local_crops=2, prototype_bias=True))
    assert m.prototypes.bias is not None and build_method("swav", _vit(), _cfg()).prototypes.bias is None
    with torch.no_grad():
        m.prototypes.bias.copy_(torch.linspace(-0.2, 0.2, 10))
    ref = modules.SwaVPrototypes(16, 10)
    ref.load_state_dict({"heads.0.weight": m.prototypes.weight.detach(), "heads.0.bias": m.prototypes.bias.detach()})
    m.train()
    _bn_eval(m)
    views = m.make_views(_images(n=6), torch.Generator().manual_seed(1))
    out = m(views)
    with torch.no_grad():
        scores = [ref(F.normalize(m.projector(m.backbone.embed(v)), dim=1)) for v in views]
    expected = loss_mod.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(scores[:2], scores[2:])
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-5)
    out["loss"].backward()
    assert m.prototypes.bias.grad.abs().max() > 0
    m.before_optimizer_step(0, steps_per_epoch=4)  # first epoch: frozen, bias included
    assert m.prototypes.weight.grad is None and m.prototypes.bias.grad is None

def test_swav_loss_gradient_flows_to_predictions_only():
    high = [_cosine_scores(4, 6, seed=i).requires_grad_(True) for i in range(2)]
    low = [_cosine_scores(4, 6, seed=5).requires_grad_(True)]
    loss, _ = swav_loss(high, low)
    loss.backward()
    # The gradient of the loss in crop v's scores is the softmax-minus-codes of cross-entropy,
    # averaged: here checked for the local crop, predicted by both global crops' codes.
    q = [sinkhorn(h) for h in high]
    p = F.softmax(low[0].detach() / 0.1, dim=1)
    expected = sum((p - qi) / 0.1 / 4 / 2 / 2 for qi in q)  # / n / (crops - 1) / globals
    torch.testing.assert_close(low[0].grad, expected, atol=1e-5, rtol=1e-4)
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in high)


# ---------------------------------------------------------------- the method
def test_registry_defaults_and_config():
    assert "swav" in list_methods()  # registered by importing keel.tasks.ssl.swav
    cfg = RunConfig()
    cfg.data.img_size = 16
    m = build_method("swav", _vit(), cfg)
    assert isinstance(m, SwAV) and m.temperature == 0.1
    assert m.prototypes.weight.shape == (3000, 128) and m.prototypes.bias is None
    assert [l.out_features for l in m.projector if isinstance(l, nn.Linear)] == [2048, 128]
    assert m.multicrop.n_global == 2 and m.multicrop.n_local == 6
    assert m.queue.shape == (2, 0, 128)  # queue off by default
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(3000))  # unit at init
    m = build_method("swav", _vit(), _cfg(temperature=0.2, queue_length=64))
    assert m.temperature == 0.2 and m.queue.shape == (2, 64, 16) and m.prototypes.weight.shape == (10, 16)
    with pytest.raises(ConfigError, match="sinkhorn_eps"):
        SwAV(_vit(), _cfg(sinkhorn_eps=0.01))


def test_prototypes_renormalized_at_every_step_start():
    m = SwAV(_vit(), _cfg())
    with torch.no_grad():
        m.prototypes.weight.mul_(torch.rand(10, 1) * 3 + 0.1)
    direction = F.normalize(m.prototypes.weight.detach(), dim=1)
    m.on_step_start(5, 4, 100)
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(m.prototypes.weight.detach(), direction)


def test_make_views_multi_crop_and_determinism():
    m = SwAV(_vit(), _cfg(img_size=16, local_crops=3))
    views = m.make_views(_images(n=5, size=20), torch.Generator().manual_seed(7))
    assert [tuple(v.shape) for v in views] == [(5, 3, 16, 16)] * 2 + [(5, 3, 8, 8)] * 3
    again = m.make_views(_images(n=5, size=20), torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[2], views[3])


def test_training_step_matches_lightly_on_the_methods_own_scores():
    loss_mod = pytest.importorskip("lightly.loss")
    torch.manual_seed(0)
    m = SwAV(_vit(), _cfg(local_crops=2))
    m.train()
    _bn_eval(m)  # per-sample projections: the scores can be recomputed crop by crop
    views = m.make_views(_images(n=6), torch.Generator().manual_seed(1))
    out = m(views)
    with torch.no_grad():
        scores = [m.prototypes(F.normalize(m.projector(m.backbone.embed(v)), dim=1)) for v in views]
    ref = loss_mod.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(scores[:2], scores[2:])
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)
    codes = torch.cat([sinkhorn(s) for s in scores[:2]])
    entropy = -(codes * codes.log()).sum(1).mean()
    assert out["code_entropy"].item() == pytest.approx(entropy.item(), abs=1e-4)
    assert out["prototypes_used"].item() == pytest.approx(codes.argmax(1).unique().numel() / 10)


def test_training_step_embeds_each_resolution_in_one_backbone_call():
    m = SwAV(_vit(), _cfg(local_crops=3))
    calls = []
    embed = m.backbone.embed
    m.backbone.embed = lambda x: calls.append(tuple(x.shape)) or embed(x)
    m(m.make_views(_images(n=4), torch.Generator().manual_seed(0)))
    assert calls == [(8, 3, 16, 16), (12, 3, 8, 8)]  # 2 globals together, then 3 locals together


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_training_step_gradients_and_float32_loss_under_autocast(kind):
    torch.manual_seed(0)
    backbone = _vit() if kind == "vit" else keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16))
    m = SwAV(backbone, _cfg(local_crops=2))
    m.train()
    views = m.make_views(_images(n=6), torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(views)
    loss = out["loss"]
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    # each term is a cross-entropy H(q) + KL(q || p) >= H(q): the loss is at least the codes' entropy
    assert out["code_entropy"].dim() == 0 and 0 < out["code_entropy"].item() <= math.log(10) + 1e-5
    assert loss.item() >= out["code_entropy"].item() - 1e-5
    assert 0 < out["prototypes_used"].item() <= 1
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert next(m.backbone.parameters()).grad.abs().sum() > 0
    assert m.prototypes.weight.grad.abs().sum() > 0


def test_scores_queue_and_loss_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    cfg = _cfg(local_crops=1, queue_length=16, queue_start_epoch=0)
    cfg.train.batch_size = 6
    m = SwAV(_vit(), cfg)
    m.train()
    with torch.no_grad():
        m.queue.copy_(F.normalize(torch.randn(2, 16, 16), dim=2))
    m.on_step_start(5, 1, 10)  # queue full and in use
    views = m.make_views(_images(n=6), torch.Generator().manual_seed(0))
    queue = m.queue.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = m.embed(views)  # the bf16 part: backbone and projector
        loss = m(views)["loss"]
    assert z.dtype == torch.bfloat16 and loss.dtype == torch.float32
    # from the bf16 projections on, everything in float32 (queue scores included)
    s = m.prototypes(F.normalize(z.float(), dim=1)).split(6)
    ref, _ = swav_loss(s[:2], s[2:], 0.1, 3, 0.05, [queue[i] @ m.prototypes.weight.T for i in range(2)])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    bf16_queue = [(queue[i].bfloat16() @ m.prototypes.weight.bfloat16().T).float() for i in range(2)]
    assert abs(swav_loss(s[:2], s[2:], 0.1, 3, 0.05, bf16_queue)[0].item() - ref.item()) > 1e-4


# ---------------------------------------------------------------- the queue
def test_queue_unused_before_start_filled_fifo_used_once_full_and_exact_after_state_dict_round_trip():
    # 4 images per step, 2 steps per epoch; a queue of 3 batches, pushed to from epoch 1 (step 2),
    # full after steps 2, 3 and 4, so used from step 5 on
    n, spe = 4, 2
    cfg = _cfg(local_crops=1, queue_length=12, queue_start_epoch=1)
    cfg.train.batch_size = n
    torch.manual_seed(0)
    m = SwAV(_vit(), cfg)
    m.train()
    _bn_eval(m)
    batches = [m.make_views(_images(n=n, seed=s), torch.Generator().manual_seed(s)) for s in range(8)]

    def feats(views):  # the unit projections of the global crops, (2, n, d)
        with torch.no_grad():
            return torch.stack([F.normalize(m.projector(m.backbone.embed(v)), dim=1) for v in views[:2]])

    def expected_loss(views, with_queue):
        with torch.no_grad():
            s = [m.prototypes(f) for f in feats(views)]
            local = [m.prototypes(F.normalize(m.projector(m.backbone.embed(views[2])), dim=1))]
            q = [m.queue[i] @ m.prototypes.weight.T for i in range(2)] if with_queue else None
            return swav_loss(s, local, 0.1, 3, 0.05, q)[0].item()

    history = []
    for step in range(7):
        m.on_step_start(step, spe, 100)
        used = step >= 5
        ref = expected_loss(batches[step], used)
        assert m(batches[step])["loss"].item() == pytest.approx(ref, abs=1e-5), step
        if used:  # the queue does change the loss
            assert ref != pytest.approx(expected_loss(batches[step], False), abs=1e-4)
        if step < 2:
            assert not m.queue.any()
            continue
        history.insert(0, feats(batches[step]))
        expected_queue = torch.cat(history[:3], dim=1)  # newest first, the oldest batches dropped
        torch.testing.assert_close(m.queue[:, :expected_queue.shape[1]], expected_queue, atol=1e-6, rtol=1e-5)
        assert not m.queue[:, expected_queue.shape[1]:].any()

    # A fresh method given the state dict (as on resume) continues exactly.
    m2 = SwAV(_vit(), cfg)
    m2.load_state_dict(m.state_dict())
    m2.train()
    _bn_eval(m2)
    assert torch.equal(m2.queue, m.queue)
    for method in (m, m2):
        method.on_step_start(7, spe, 100)
    assert m2(batches[7])["loss"].item() == m(batches[7])["loss"].item()
    assert torch.equal(m2.queue, m.queue)

    # The queue checks the batch size it was told (train.batch_size) against the batch it gets.
    with pytest.raises(RuntimeError, match="train.batch_size=4"):
        m(m.make_views(_images(n=3), torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------- with the trainer
def test_prototypes_frozen_during_first_steps_then_trained(make_cfg, tmp_path):
    from keel.data.sources import build_dataset
    from keel.engine.trainer import Trainer

    # 4 steps per epoch; frozen for half an epoch = steps 0 and 1
    over = ["method.name=swav", "method.num_prototypes=16", "aug.local_crops=1",
            "method.freeze_prototypes_epochs=0.5", "train.weight_decay=0.1"]
    cfg = make_cfg(*over, "train.max_steps=2")
    data = build_dataset("digits", "train", 8, labeled=False, subset=256, seed=0)
    torch.manual_seed(0)
    m = SwAV(keel.create_model("resnet10_cifar"), cfg)
    w0 = m.prototypes.weight.detach().clone()
    b0 = next(m.backbone.parameters()).detach().clone()
    Trainer(cfg, tmp_path / "run", quiet=True).fit(m, data)
    torch.testing.assert_close(m.prototypes.weight.detach(), w0, atol=1e-6, rtol=0)  # only renormalized
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(16))
    assert (next(m.backbone.parameters()).detach() - b0).abs().max() > 1e-4

    # resumed for one more step (step 2, unfrozen): the prototypes move
    Trainer(make_cfg(*over, "train.max_steps=3"), tmp_path / "run", resume=True, quiet=True).fit(m, data)
    assert (m.prototypes.weight.detach() - w0).abs().max() > 1e-5
    m.on_step_start(3, 4, 8)
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(16))


def test_pretrain_smoke_with_multi_crop(make_cfg, tmp_path):
    import json

    from keel.jobs.pretrain import pretrain
    cfg = make_cfg("method.name=swav", "train.max_steps=3", "data.img_size=16", "aug.local_crops=2",
                   "method.num_prototypes=16", "method.queue_length=128", "method.queue_start_epoch=0")
    res = pretrain(cfg, run_dir=tmp_path / "run", quiet=True)
    assert res["steps"] == 3 and math.isfinite(res["loss"])
    assert (tmp_path / "run" / "backbone.safetensors").is_file()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and 0 < r["prototypes_used"] <= 1 for r in lines if "loss" in r)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["method"]["queue"][:, :128].any()  # the queue is saved with the checkpoint


# ---------------------------------------------------------------- 2 processes == 1 process
def _dist_method(queue_length: int = 0):
    cfg = _cfg(local_crops=2, queue_length=queue_length, queue_start_epoch=0)
    cfg.train.batch_size = BATCH
    return SwAV(_vit(), cfg)


def _run_queue_steps(model, method, steps):
    """Steps 0 and 1 fill the queue of 12 (no gradient), step 2 uses it; returns step 2's loss."""
    for step, views in enumerate(steps):
        method.on_step_start(step, 1, 10)
        assert method._use_queue == (step == 2)
        if step < 2:
            with torch.no_grad():
                model(views)
    loss = model(steps[2])["loss"]
    loss.backward()
    return loss.detach()


def _worker(task: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    info = D.init_distributed("cpu")
    r, w = info.rank, info.world_size
    inp = torch.load(task / "inputs.pt", weights_only=True)
    out = {"codes": sinkhorn(_shard(inp["scores"], r, w)),
           "codes_uneven": sinkhorn(inp["scores"][:3] if r == 0 else inp["scores"][3:])}
    for key, queue_length in (("plain", 0), ("queue", 12)):
        method = _dist_method(queue_length)
        method.load_state_dict(inp["method"], strict=False)
        method.train()
        _bn_eval(method)
        ddp = DDP(method)
        steps = [[_shard(v, r, w) for v in views] for views in inp["steps"]]
        if queue_length:
            out[f"{key}_loss"] = _run_queue_steps(ddp, method, steps)
            out[f"{key}_queue"] = method.queue.clone()
        else:
            loss = ddp(steps[0])["loss"]
            loss.backward()
            out[f"{key}_loss"] = loss.detach()
        out[f"{key}_grads"] = {k: p.grad.clone() for k, p in method.named_parameters()}
    torch.save(out, task / f"rank{r}.pt")
    D.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, launch_workers):
    torch.manual_seed(0)
    method = _dist_method()
    g = torch.Generator().manual_seed(1)
    steps = [[torch.randn(BATCH, 3, s, s, generator=g) for s in (16, 16, 8, 8)] for _ in range(3)]
    scores = _cosine_scores(BATCH, 10, seed=4)
    weights = {k: v for k, v in method.state_dict().items() if k != "queue"}  # the queue's size differs
    torch.save({"method": weights, "steps": steps, "scores": scores}, tmp_path / "inputs.pt")
    results = launch_workers(__file__, tmp_path, WORLD)

    # Sinkhorn: the codes of each process's rows are the one-process codes of those rows,
    # however the batch is split.
    ref_codes = sinkhorn(scores)
    torch.testing.assert_close(torch.cat([res["codes"] for res in results]), ref_codes, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([res["codes_uneven"] for res in results]), ref_codes,
                               atol=1e-6, rtol=1e-5)

    for key, queue_length in (("plain", 0), ("queue", 12)):
        ref_method = _dist_method(queue_length)
        ref_method.load_state_dict(weights, strict=False)
        ref_method.train()
        _bn_eval(ref_method)
        if queue_length:
            ref_loss = _run_queue_steps(ref_method, ref_method, steps)
            for res in results:  # every process holds the same, global queue
                torch.testing.assert_close(res[f"{key}_queue"], ref_method.queue, atol=1e-6, rtol=1e-5)
            # 3 batches of 8 in a queue of 12: the newest 8, then the first 4 of the one before
            with torch.no_grad():
                f = [torch.stack([F.normalize(ref_method.projector(ref_method.backbone.embed(v)), dim=1)
                                  for v in views[:2]]) for views in steps]
            torch.testing.assert_close(ref_method.queue, torch.cat([f[2], f[1][:, :4]], dim=1), atol=1e-6, rtol=1e-5)
        else:
            ref_loss = ref_method(steps[0])["loss"]
            ref_loss.backward()
        mean_loss = sum(res[f"{key}_loss"] for res in results) / WORLD
        assert mean_loss.item() == pytest.approx(ref_loss.item(), abs=1e-5), key
        for name, p in ref_method.named_parameters():
            for res in results:  # DDP averaged the gradients: both ranks hold the same
                torch.testing.assert_close(res[f"{key}_grads"][name], p.grad, atol=1e-5, rtol=1e-4,
                                           msg=lambda m: f"{key} {name}: {m}")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
