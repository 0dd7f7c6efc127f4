"""DINO: the loss against lightly and a hand-computed case, the centre, the schedules, the
EMA teacher, the head, the last-layer freeze, 2 processes == 1, and one real training run."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import keel
import keel.tasks.ssl.dino  # noqa: F401  (registers "dino")
from keel.config import RunConfig
from keel.engine import distributed as D
from keel.engine.optim import build_optimizer, param_groups
from keel.tasks.ssl import build_method
from keel.tasks.ssl.dino import (DINO, DINOHead, cross_view_entropy, dino_loss, sharpen, teacher_temperature,
                               update_center)
from keel.tasks.ssl.momentum import cosine_momentum
from keel.models.layers.drop import DropPath

WORLD = 2
BATCH = 8  # images per view in the combined batch of the 2-process check


# ---------------------------------------------------------------- the loss
def test_loss_and_center_update_match_lightly():
    loss_mod = pytest.importorskip("lightly.loss")
    g = torch.Generator().manual_seed(0)
    for n_t, n_s, b, k, tt, ts in [(2, 6, 5, 32, 0.04, 0.1), (2, 2, 7, 16, 0.07, 0.2), (2, 4, 3, 64, 0.05, 0.1)]:
        teacher = [torch.randn(b, k, generator=g) * 3 for _ in range(n_t)]
        student = [torch.randn(b, k, generator=g) * 3 for _ in range(n_s)]
        center0 = torch.randn(1, k, generator=g)
        ref_fn = loss_mod.DINOLoss(output_dim=k, warmup_teacher_temp=tt, teacher_temp=tt, warmup_teacher_temp_epochs=0,
                                   student_temp=ts, center_momentum=0.9)
        ref_fn.center.copy_(center0.view(1, 1, k))
        ref = ref_fn(teacher, student, epoch=5)  # past the warm-up: teacher_temp
        center = center0.clone()
        got = dino_loss(torch.stack(teacher), torch.stack(student), center, tt, ts)
        assert got.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-6)
        update_center(center, torch.stack(teacher), 0.9)
        torch.testing.assert_close(center, ref_fn.center.view(1, k), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(center, center0)


def test_loss_by_hand_two_dims():
    # One image, two global views, 2 output dims. Teacher view 0 -> student view 1 and teacher
    # view 1 -> student view 0 are the only pairs.
    t = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])           # (2 views, 1 image, 2 dims)
    s = torch.tensor([[[0.3, -0.1]], [[1.0, 0.5]]])
    c = torch.tensor([[0.5, 0.25]])
    tt, ts = 0.5, 0.1

    def softmax2(a, b):
        ea, eb = math.exp(a), math.exp(b)
        return ea / (ea + eb), eb / (ea + eb)

    q0 = softmax2((2.0 - 0.5) / tt, (0.0 - 0.25) / tt)
    q1 = softmax2((0.0 - 0.5) / tt, (1.0 - 0.25) / tt)
    p0 = softmax2(0.3 / ts, -0.1 / ts)
    p1 = softmax2(1.0 / ts, 0.5 / ts)
    ce01 = -(q0[0] * math.log(p1[0]) + q0[1] * math.log(p1[1]))
    ce10 = -(q1[0] * math.log(p0[0]) + q1[1] * math.log(p0[1]))
    expected = (ce01 + ce10) / 2
    assert dino_loss(t, s, c, tt, ts).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.9340, abs=1e-4)  # (0.1533 + 3.7147) / 2, worked on paper
    # a single pair (one teacher view, two student views): only (0, 1) counts
    assert dino_loss(t[:1], s, c, tt, ts).item() == pytest.approx(ce01, rel=1e-6)
    # the centre update: 0.9 * c + 0.1 * mean of the teacher outputs over views and batch
    center = c.clone()
    update_center(center, t, 0.9)
    torch.testing.assert_close(center, torch.tensor([[0.9 * 0.5 + 0.1 * 1.0, 0.9 * 0.25 + 0.1 * 0.5]]))


def test_loss_needs_a_pair():
    with pytest.raises(ValueError, match="no pair"):
        dino_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.zeros(1, 4), 0.04)


def test_loss_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    q = sharpen(torch.randn(2, 4, 128, generator=g), torch.zeros(1, 128), 0.04)
    s = torch.randn(6, 4, 128, generator=g)
    ref = cross_view_entropy(q, s, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cross_view_entropy(q, s, 0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)  # the einsum did not run in bf16


def test_teacher_temperature_schedule():
    # 0.04 -> 0.07 over 2 epochs of 10 steps, then constant
    for step, want in [(0, 0.04), (5, 0.0475), (10, 0.055), (19, 0.04 + 0.03 * 19 / 20), (20, 0.07), (500, 0.07)]:
        assert teacher_temperature(step, 10, 0.04, 0.07, 2.0) == pytest.approx(want, abs=1e-12), step
    assert teacher_temperature(0, 10, 0.04, 0.07, 0.0) == 0.07  # no warm-up
    assert teacher_temperature(3, 4, 0.04, 0.07, 0.5) == 0.07   # fractional epochs: 2 warm-up steps


# ---------------------------------------------------------------- the head
def test_head_layers_and_normalized_last_layer():
    torch.manual_seed(0)
    head = DINOHead(12, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [16, 16, 4]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert head.last_layer.weight.shape == (10, 4) and not hasattr(head.last_layer, "bias")
    x = torch.randn(5, 12)
    z = F.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight
    torch.testing.assert_close(head(x), z @ (w / w.norm(dim=1, keepdim=True)).T)
    # outputs are cosines: scaling the last layer's rows changes nothing
    with torch.no_grad():
        before = head(x)
        w.mul_(torch.rand(10, 1) * 5 + 0.1)
        torch.testing.assert_close(head(x), before)
    assert head(x).abs().max() <= 1 + 1e-6


def test_last_layer_equals_torch_weight_norm_with_unit_gain():
    # the official head: weight_norm(Linear(bottleneck, out, bias=False)) with weight_g = 1, frozen
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(1)
    head = DINOHead(6, out_dim=7, hidden_dim=8, bottleneck_dim=3)
    official = weight_norm(nn.Linear(3, 7, bias=False))
    with torch.no_grad():
        official.parametrizations.weight.original0.fill_(1.0)
        official.parametrizations.weight.original1.copy_(head.last_layer.weight)
    z = torch.randn(4, 3)
    torch.testing.assert_close(head.last_layer(z), official(z))
    (head.last_layer(z) ** 2).sum().backward()
    (official(z) ** 2).sum().backward()
    torch.testing.assert_close(head.last_layer.weight.grad, official.parametrizations.weight.original1.grad)


# ---------------------------------------------------------------- the method
def _cfg(**method) -> RunConfig:
    cfg = RunConfig()
    cfg.data.img_size = 16
    cfg.aug.local_crops = 2
    cfg.method.name = "dino"
    cfg.method.out_dim = 64
    cfg.method.proj_hidden_dim = 32
    cfg.method.proj_dim = 16
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg


def _vit(**kw):
    return keel.create_model("vit_tiny_patch4_32", img_size=16, depth=2, dim=48, num_heads=3, **kw)


def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_defaults_and_registry():
    cfg = RunConfig()
    m = build_method("dino", keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16)), cfg)
    assert isinstance(m, DINO)
    assert m.out_dim == 65536 and m.head.last_layer.weight.shape == (65536, 256)
    assert [l.out_features for l in m.head.mlp if isinstance(l, nn.Linear)] == [2048, 2048, 256]
    assert m.student_temp == 0.1 and m.base_momentum == 0.996 and m.crops.n_local == 6
    assert m.center.shape == (1, 65536)


def test_teacher_is_a_frozen_saved_submodule_outside_the_optimizer():
    torch.manual_seed(0)
    m = DINO(_vit(drop_path_rate=0.1), _cfg())
    keys = m.state_dict().keys()
    assert any(k.startswith("teacher.backbone.") for k in keys) and any(k.startswith("teacher.head.") for k in keys)
    assert "center" in keys and "teacher_temp" not in keys and "momentum" not in keys
    teacher_ids = {id(p) for p in m.teacher.parameters()}
    assert teacher_ids and all(not p.requires_grad for p in m.teacher.parameters())
    in_opt = {id(p) for g in param_groups(m, 0.04) for p in g["params"]}
    assert not in_opt & teacher_ids
    assert in_opt == {id(p) for n, p in m.named_parameters() if not n.startswith("teacher.")}
    # the teacher starts as the student, and has no stochastic depth
    for (n, t), s in zip(m.teacher["backbone"].named_parameters(), m.backbone.parameters()):
        assert torch.equal(t, s), n
    assert all(d.p == 0 for d in m.teacher.modules() if isinstance(d, DropPath))
    assert any(d.p > 0 for d in m.backbone.modules() if isinstance(d, DropPath))

    m.train()
    out = m(m.make_views(_images(4), torch.Generator().manual_seed(0)))
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(p.grad is not None for n, p in m.named_parameters() if not n.startswith("teacher."))


def test_ema_update_of_the_teacher():
    torch.manual_seed(0)
    m = DINO(_vit(), _cfg())
    with torch.no_grad():  # move the student away from the teacher
        for p in list(m.backbone.parameters()) + list(m.head.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    old_t = [p.detach().double().clone() for p in m.teacher.parameters()]
    student = [p.detach().double().clone() for p in list(m.backbone.parameters()) + list(m.head.parameters())]
    m.on_step_end(3, 10)
    mom = 1 - (1 - 0.996) * (math.cos(math.pi * 0.3) + 1) / 2
    assert mom == pytest.approx(cosine_momentum(3, 10, 0.996))
    for t, t0, s in zip(m.teacher.parameters(), old_t, student):
        torch.testing.assert_close(t.double(), mom * t0 + (1 - mom) * s, atol=1e-7, rtol=0)


def test_schedules_are_set_by_on_step_start_and_logged():
    torch.manual_seed(0)
    m = DINO(_vit(), _cfg(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2.0))
    assert m.teacher_temp.item() == pytest.approx(0.04)  # step 0 before any hook
    m.on_step_start(5, 10, 100)
    assert m.teacher_temp.item() == pytest.approx(0.0475)
    assert m.momentum.item() == pytest.approx(cosine_momentum(5, 100, 0.996))
    m.train()
    out = m(m.make_views(_images(4), torch.Generator().manual_seed(0)))
    assert float(out["teacher_temp"]) == pytest.approx(0.0475)
    assert float(out["momentum"]) == pytest.approx(cosine_momentum(5, 100, 0.996))
    assert 0 < float(out["teacher_entropy"]) <= math.log(64) + 1e-5


def _record_embed_calls(m: DINO) -> dict:
    """Make the student's and the teacher's backbone record the shape of every embed call."""
    calls = {"student": [], "teacher": []}
    for who, bb in (("student", m.backbone), ("teacher", m.teacher["backbone"])):
        bb.embed = (lambda f, lst: lambda x: (lst.append(tuple(x.shape)), f(x))[1])(bb.embed, calls[who])
    return calls


def _per_crop_dino(monkeypatch, **method) -> DINO:
    """A small ResNet DINO (teacher temperature 0.04 throughout) that calls its backbones once per
    crop, as benchmarks/ssl_methods.py --per-crop makes it: _same_size_runs becomes list."""
    pytest.importorskip("lightly")
    import keel.tasks.ssl.dino as dino_mod
    monkeypatch.setattr(dino_mod, "_same_size_runs", list)
    torch.manual_seed(0)
    m = DINO(keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16)),
             _cfg(teacher_temp=0.04, warmup_teacher_temp_epochs=0.0, **method))
    return m.train()


def _lightly_dino(m: DINO):
    """lightly's student, teacher (backbone + DINOProjectionHead) and DINOLoss, with the weights
    and centre of keel's ``m``."""
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead

    def net(backbone, head):
        ref = DINOProjectionHead(16, 32, 16, 64, freeze_last_layer=1)
        state = {k.replace("mlp.", "layers."): v for k, v in head.state_dict().items() if k != "last_layer.weight"}
        ref.load_state_dict({**state, "last_layer.weight_v": head.last_layer.weight.detach().clone(),
                             "last_layer.weight_g": torch.ones(64, 1)})
        out = nn.Sequential(keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16)), ref)
        out[0].load_state_dict(backbone.state_dict())
        return out.train()

    criterion = DINOLoss(output_dim=64, warmup_teacher_temp_epochs=0, teacher_temp=0.04, student_temp=0.1)
    criterion.center.copy_(m.center.view(1, 1, -1))
    return net(m.backbone, m.head), net(m.teacher["backbone"], m.teacher["head"]), criterion


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_training_step_views_and_one_call_per_resolution(kind):
    torch.manual_seed(0)
    backbone = _vit() if kind == "vit" else keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16))
    m = DINO(backbone, _cfg())
    m.train()
    views = m.make_views(_images(4, size=20), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    calls = _record_embed_calls(m)
    center0 = m.center.clone()
    out = m(views)
    assert calls["student"] == [(8, 3, 16, 16), (8, 3, 8, 8)]
    assert calls["teacher"] == [(8, 3, 16, 16)]  # the teacher sees the global crops only
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    # the loss is the formula on the two networks' outputs, with the centre before its update
    with torch.no_grad():
        s = m.head(torch.cat([orig_embed(m.backbone, torch.cat(views[:2])),
                              orig_embed(m.backbone, torch.cat(views[2:]))]))
        t = m.teacher["head"](orig_embed(m.teacher["backbone"], torch.cat(views[:2])))
        # (ResNet: BN in training mode sees the same batches, so the same statistics)
        want = dino_loss(t.view(2, 4, -1), s.view(4, 4, -1), center0, 0.04, 0.1)
    assert out["loss"].item() == pytest.approx(want.item(), abs=1e-5)
    torch.testing.assert_close(m.center, 0.9 * center0 + 0.1 * t.mean(0, keepdim=True))
    out["loss"].backward()
    assert sum(p.grad.abs().sum() for p in m.backbone.parameters()) > 0


def test_one_call_per_crop_equals_lightlys_dino(monkeypatch):
    # benchmarks/ssl_methods.py --per-crop (lightly's way) replaces _same_size_runs with list:
    # the student and the teacher then call their backbone once per crop, and the step is
    # lightly's (student, teacher, loss and centre on the same weights), gradients included.
    # What is left between keel's default and lightly's DINO is which images share a BatchNorm batch.
    m = _per_crop_dino(monkeypatch)
    with torch.no_grad():  # a teacher and a centre away from their start, as mid-run
        for p in m.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        m.center.normal_(0, 0.1)
    student, teacher, criterion = _lightly_dino(m)
    views = m.make_views(_images(4, size=20), torch.Generator().manual_seed(0))
    calls = _record_embed_calls(m)
    out = m(views)
    assert calls["student"] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    assert calls["teacher"] == [(4, 3, 16, 16)] * 2
    with torch.no_grad():
        t_out = [teacher(v) for v in views[:2]]
    ref = criterion(t_out, [student(v) for v in views], epoch=1)
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(m.center, criterion.center.view(1, -1))
    out["loss"].backward()
    ref.backward()
    for (name, p), q in zip(m.backbone.named_parameters(), student[0].parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(m.head.last_layer.weight.grad, student[1].last_layer.weight_v.grad,
                               atol=1e-6, rtol=1e-4)
    assert m.head.last_layer.weight.grad.abs().sum() > 0


def test_training_with_one_call_per_crop_follows_lightlys_dino(monkeypatch):
    # keel's hooks (EMA teacher after the step, last layer frozen for the first epoch, schedules)
    # against lightly's loop code for DINO: 10 steps from the same weights on the same views,
    # each with its own AdamW, through the end of the frozen epoch (steps_per_epoch = 4).
    m = _per_crop_dino(monkeypatch, momentum=0.9)
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule
    student, teacher, criterion = _lightly_dino(m)
    opt_k = build_optimizer("adamw", m, lr=1e-3, weight_decay=0.04)
    opt_l = build_optimizer("adamw", nn.ModuleList([student, teacher]), lr=1e-3, weight_decay=0.04)
    spe, total = 4, 40
    for step in range(10):
        views = m.make_views(_images(8, size=20, seed=step), torch.Generator().manual_seed(step))
        m.on_step_start(step, spe, total)
        loss_k = m(views)["loss"]
        opt_k.zero_grad(set_to_none=True)
        loss_k.backward()
        m.before_optimizer_step(step, spe)
        opt_k.step()
        m.on_step_end(step, total)

        # lightly's loop moves the teacher before the forward of step s, with m(s); keel after the
        # optimizer step s - 1, with m(s - 1). The schedules are alike, the step offset aside:
        # lightly is given keel's value here, since this tiny network amplifies a 2e-4 change in m.
        assert cosine_schedule(step, total, 0.9, 1.0) == pytest.approx(cosine_momentum(step, total, 0.9), abs=3e-3)
        update_momentum(student, teacher, m=cosine_momentum(step - 1, total, 0.9))  # step 0: 0.9, a no-op
        with torch.no_grad():
            t_out = [teacher(v) for v in views[:2]]
        loss_l = criterion(t_out, [student(v) for v in views], epoch=step // spe)
        opt_l.zero_grad(set_to_none=True)
        loss_l.backward()
        student[1].cancel_last_layer_gradients(current_epoch=step // spe)
        opt_l.step()
        assert loss_k.item() == pytest.approx(loss_l.item(), rel=1e-4), step
    torch.testing.assert_close(m.head.last_layer.weight, student[1].last_layer.weight_v, atol=1e-4, rtol=1e-3)
    update_momentum(student, teacher, m=cosine_momentum(9, total, 0.9))  # keel's teacher moved after step 9
    torch.testing.assert_close(m.teacher["head"].last_layer.weight, teacher[1].last_layer.weight_v,
                               atol=1e-4, rtol=1e-3)
    assert not torch.allclose(m.teacher["head"].last_layer.weight, m.head.last_layer.weight)


def orig_embed(backbone, x):
    return type(backbone).embed(backbone, x)


def test_last_layer_frozen_during_the_first_epoch():
    torch.manual_seed(0)
    m = DINO(_vit(), _cfg())
    m.train()
    opt = build_optimizer("adamw", m, lr=1e-2, weight_decay=0.04)
    images = _images(4)

    def step(s, spe=4):
        m.on_step_start(s, spe, 40)
        views = m.make_views(images, torch.Generator().manual_seed(s))
        opt.zero_grad(set_to_none=True)
        m(views)["loss"].backward()
        m.before_optimizer_step(s, spe)
        opt.step()
        m.on_step_end(s, 40)

    last = m.head.last_layer.weight
    w0, mlp0 = last.detach().clone(), m.head.mlp[0].weight.detach().clone()
    step(0)
    assert torch.equal(last, w0)  # no gradient step and no weight decay in epoch 0
    assert not torch.equal(m.head.mlp[0].weight, mlp0)
    step(3)
    assert torch.equal(last, w0)
    step(4)  # epoch 1
    assert not torch.equal(last, w0)


def test_state_dict_holds_all_cross_step_state():
    # After a step, a fresh method loaded from the state dict continues exactly like the original.
    torch.manual_seed(0)
    cfg = _cfg(warmup_teacher_temp=0.03, teacher_temp=0.06, warmup_teacher_temp_epochs=1.0)
    a = DINO(_vit(), cfg)
    a.train()
    images = _images(4)
    a.on_step_start(0, 4, 40)
    a(a.make_views(images, torch.Generator().manual_seed(0)))["loss"].backward()
    with torch.no_grad():
        for p in a.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    a.on_step_end(0, 40)
    torch.manual_seed(1)
    b = DINO(_vit(), cfg)
    b.load_state_dict(a.state_dict())
    b.train()
    outs = []
    for m in (a, b):
        m.on_step_start(1, 4, 40)
        outs.append(m(m.make_views(images, torch.Generator().manual_seed(1))))
    assert torch.equal(outs[0]["loss"], outs[1]["loss"])
    assert torch.equal(a.center, b.center) and a.center.abs().sum() > 0


# ---------------------------------------------------------------- 2 processes == 1 process
def _method():
    cfg = _cfg(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=1.0,
               freeze_prototypes_epochs=0.0)
    return DINO(_vit(), cfg)


def _shard(x, r, w):
    n = len(x) // w
    return x[r * n:(r + 1) * n]


def _one_step(model, method, views, opt):
    method.on_step_start(2, 4, 40)
    out = model(views)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    method.before_optimizer_step(2, 4)  # freeze_prototypes_epochs=0: the last layer trains
    opt.step()
    method.on_step_end(2, 40)
    return {"loss": out["loss"].detach(), "grads": grads, "center": method.center.clone(),
            "teacher": {k: v.clone() for k, v in method.teacher.state_dict().items()}}


def _worker(task: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    r, w = info.rank, info.world_size
    inp = torch.load(task / "inputs.pt", weights_only=True)
    method = _method()
    method.load_state_dict(inp["method"])
    method.train()
    ddp = DDP(method)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    out = _one_step(ddp, method, [_shard(v, r, w) for v in inp["views"]], opt)
    torch.save(out, task / f"rank{r}.pt")
    D.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, launch_workers):
    torch.manual_seed(0)
    method = _method()
    with torch.no_grad():
        method.center.normal_()  # a centre that is not zero, so both of its terms count
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(BATCH, 3, 16, 16, generator=g) for _ in range(2)] + \
            [torch.randn(BATCH, 3, 8, 8, generator=g) for _ in range(2)]
    torch.save({"method": method.state_dict(), "views": views}, tmp_path / "inputs.pt")
    results = launch_workers(__file__, tmp_path, WORLD)

    method.train()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    ref = _one_step(method, method, views, opt)

    losses = [res["loss"].item() for res in results]
    assert losses[0] != losses[1]
    assert sum(losses) / WORLD == pytest.approx(ref["loss"].item(), abs=1e-6)
    for res in results:
        torch.testing.assert_close(res["center"], ref["center"], atol=1e-6, rtol=1e-6)  # all-reduced
        assert set(res["grads"]) == set(ref["grads"])
        for name, gr in ref["grads"].items():
            if name == "backbone.cls_token":  # tiny init: compare relative to its scale (see test_distributed)
                assert (res["grads"][name] - gr).abs().max() <= 1e-6 + 1e-5 * gr.abs().max(), name
            else:
                torch.testing.assert_close(res["grads"][name], gr, atol=1e-6, rtol=1e-5, msg=name)
        for k, v in ref["teacher"].items():
            torch.testing.assert_close(res["teacher"][k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert ref["grads"]["head.last_layer.weight"].abs().sum() > 0


# ---------------------------------------------------------------- the real trainer
def test_pretrain_smoke(make_cfg, tmp_path):
    from keel.jobs.pretrain import pretrain
    cfg = make_cfg("method.name=dino", "data.img_size=16", "aug.local_crops=2", "method.out_dim=64",
                   "method.proj_hidden_dim=32", "method.proj_dim=16", "train.max_steps=3")
    result = pretrain(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result["steps"] == 3 and math.isfinite(result["loss"])
    assert (tmp_path / "run" / "backbone.safetensors").is_file()
    recs = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if s]
    assert all(k in recs[-1] for k in ("teacher_temp", "momentum", "teacher_entropy"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["method"]
    assert state["center"].abs().sum() > 0 and any(k.startswith("teacher.") for k in state)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_the_teacher_is_exported(make_cfg):
    from keel.tasks.ssl import build_method
    m = build_method("dino", keel.create_model("resnet10_cifar"),
                     make_cfg("method.name=dino", "method.out_dim=32", "method.proj_hidden_dim=16", "method.proj_dim=8"))
    assert m.export_backbone() is m.teacher["backbone"] and m.export_backbone() is not m.backbone


def test_head_from_a_seed_is_lightlys_head_from_that_seed():
    # keel's DINOHead draws its MLP by the inverse CDF, as lightly's DINOProjectionHead (and the
    # official code) do, and consumes the random stream alike: from the same seed the two heads
    # start from the same weights, so keel's and lightly's DINO runs of a seed start alike.
    pytest.importorskip("lightly")
    from lightly.models.modules import DINOProjectionHead
    torch.manual_seed(7)
    ours = DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8)
    torch.manual_seed(7)
    ref = DINOProjectionHead(16, 32, 8, 64)
    state = ref.state_dict()
    for k, v in ours.state_dict().items():
        k_ref = k.replace("mlp.", "layers.").replace("last_layer.weight", "last_layer.weight_v")
        assert torch.equal(v, state[k_ref]), k
