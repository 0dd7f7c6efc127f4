"""keel.engine.optim: no-decay groups, LARS against a hand computation, warm-up + cosine."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from keel.engine.optim import LARS, build_optimizer, cosine_lr, param_groups
from keel.models.registry import create_model


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm2d(4)
        self.enc = _Tokens()
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(()))     # a 0-d parameter (e.g. a learned temperature)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_split():
    m = _Tiny()
    decay, no_decay = param_groups(m, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["lars_exclude"] is False and no_decay["lars_exclude"] is True
    assert _names(m, decay) == {"conv.weight", "lin.weight"}
    assert _names(m, no_decay) == {"cls_token", "pos_embed", "enc.mask_token", "conv.bias", "lin.bias",
                                   "norm.weight", "norm.bias", "bn.weight", "bn.bias", "scale"}
    # frozen parameters are in neither group
    assert "frozen" not in _names(m, decay) | _names(m, no_decay)


def test_param_groups_on_a_vit():
    m = create_model("vit_tiny_patch4_32")
    decay, no_decay = param_groups(m, 0.1)
    d, nd = _names(m, decay), _names(m, no_decay)
    every = {n for n, _ in m.named_parameters()}
    assert d | nd == every and not d & nd
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    for n, p in m.named_parameters():
        expect_no_decay = p.ndim <= 1 or n in ("cls_token", "pos_embed")
        assert (n in nd) == expect_no_decay, n
    assert {"cls_token", "pos_embed"} <= nd
    assert "patch_embed.proj.weight" in d and "blocks.0.attn.qkv.weight" in d


def test_build_optimizer_kinds():
    m = _Tiny()
    adamw = build_optimizer("adamw", m, lr=0.1, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert all("lars_exclude" not in g for g in adamw.param_groups)
    sgd = build_optimizer("sgd", m, lr=0.1, weight_decay=0.05, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.05, 0.0]
    lars = build_optimizer("lars", m, lr=0.1, weight_decay=0.05)
    assert isinstance(lars, LARS)
    assert [g["lars_exclude"] for g in lars.param_groups] == [False, True]
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer("adam", m, lr=0.1, weight_decay=0.0)


def _norm(rows):
    return math.sqrt(sum(v * v for r in rows for v in r))


def test_lars_two_steps_match_hand_computation():
    lin = nn.Linear(2, 2)
    w0 = [[3.0, 4.0], [0.0, 0.0]]
    b0 = [1.0, -2.0]
    gw = [[1.0, 0.0], [0.0, 1.0]]
    gb = [0.5, 0.25]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w0, dtype=torch.float64).float())
        lin.bias.copy_(torch.tensor(b0))
    lr, mom, wd, eta = 0.5, 0.9, 0.1, 0.02
    opt = LARS(param_groups(lin, wd), lr=lr, momentum=mom, eta=eta)

    # --- by hand, in Python floats
    def lars_dir(w):
        d = [[gw[i][j] + wd * w[i][j] for j in range(2)] for i in range(2)]
        trust = eta * _norm(w) / _norm(d)
        return [[trust * v for v in r] for r in d]

    w, b = [r[:] for r in w0], b0[:]
    buf_w, buf_b = None, None
    for _ in range(2):
        d = lars_dir(w)
        # first step: buffer = update (PyTorch SGD convention); then buffer = m * buffer + update
        buf_w = d if buf_w is None else [[mom * buf_w[i][j] + d[i][j] for j in range(2)] for i in range(2)]
        buf_b = gb[:] if buf_b is None else [mom * buf_b[k] + gb[k] for k in range(2)]
        w = [[w[i][j] - lr * buf_w[i][j] for j in range(2)] for i in range(2)]
        b = [b[k] - lr * buf_b[k] for k in range(2)]

        lin.weight.grad = torch.tensor(gw)
        lin.bias.grad = torch.tensor(gb)
        opt.step()
        torch.testing.assert_close(lin.weight.detach(), torch.tensor(w), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(lin.bias.detach(), torch.tensor(b), rtol=1e-6, atol=1e-7)

    # the trust ratio really mattered: a plain SGD step would have moved the weight far more
    assert abs(lin.weight[0, 0].item() - 3.0) < 0.2      # plain SGD: > 0.6


def test_lars_zero_weight_uses_unit_trust_and_skips_missing_grads():
    w = nn.Parameter(torch.zeros(2, 2))
    other = nn.Parameter(torch.ones(3, 3))
    opt = LARS([{"params": [w, other], "weight_decay": 0.1, "lars_exclude": False}], lr=0.1, momentum=0.9)
    w.grad = torch.full((2, 2), 2.0)
    opt.step()
    # ||w|| = 0: the trust ratio would be 0 and the weight could never move; it must be 1
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.2))
    torch.testing.assert_close(other.detach(), torch.ones(3, 3))   # no grad: untouched
    assert other not in opt.state


def test_lars_excluded_group_has_no_weight_decay_or_trust():
    p = nn.Parameter(torch.tensor([10.0, -10.0]))
    opt = LARS([{"params": [p], "weight_decay": 0.5, "lars_exclude": True}], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([1.0, 1.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([9.9, -10.1]))


def test_cosine_lr_hand_values():
    base, lo, warm, total = 1.0, 0.1, 10, 110
    # linear warm-up reaching base_lr on the last warm-up step
    assert cosine_lr(0, total, base, warm, lo) == pytest.approx(0.1)
    assert cosine_lr(4, total, base, warm, lo) == pytest.approx(0.5)
    assert cosine_lr(9, total, base, warm, lo) == pytest.approx(1.0)
    ws = [cosine_lr(s, total, base, warm, lo) for s in range(warm)]
    diffs = [b - a for a, b in zip(ws, ws[1:])]
    assert all(d == pytest.approx(0.1) for d in diffs)
    # cosine: starts at base, midpoint is the mean, ends (and stays) at min
    assert cosine_lr(10, total, base, warm, lo) == pytest.approx(1.0)
    assert cosine_lr(60, total, base, warm, lo) == pytest.approx((base + lo) / 2)
    assert cosine_lr(35, total, base, warm, lo) == pytest.approx(lo + 0.5 * (base - lo) * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(110, total, base, warm, lo) == pytest.approx(lo)
    assert cosine_lr(500, total, base, warm, lo) == pytest.approx(lo)
    # monotone decay after warm-up
    cs = [cosine_lr(s, total, base, warm, lo) for s in range(warm, total + 1)]
    assert all(b <= a + 1e-12 for a, b in zip(cs, cs[1:]))


def test_cosine_lr_without_warmup():
    assert cosine_lr(0, 100, 2.0) == pytest.approx(2.0)
    assert cosine_lr(50, 100, 2.0) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 2.0) == pytest.approx(0.0)
    # a degenerate schedule (total == warm-up) does not divide by zero
    assert cosine_lr(5, 5, 1.0, 5) == pytest.approx(1.0)


# ---------------------------------------------------------------- layer-wise lr decay, step schedule
from keel.engine.optim import (apply_lr, layer_decay_param_groups, layer_id_of, layer_ids,  # noqa: E402
                               num_layers, step_lr)


def _tiny_vit(**kw):
    return create_model("vit_tiny_patch4_32", img_size=16, depth=3, dim=48, num_heads=3, **kw)


def test_layer_ids_vit_and_decay_scales_follow_the_formula():
    m = _tiny_vit(num_classes=5)
    ids, L = layer_ids(m), num_layers(m)
    assert L == 3
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert ids[name] == 0
    for i in range(3):
        assert {v for k, v in ids.items() if k.startswith(f"blocks.{i}.")} == {i + 1}
    assert ids["norm.weight"] == ids["head.weight"] == ids["head.bias"] == L + 1

    decay = 0.65
    groups = layer_decay_param_groups(m, 0.05, decay)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters())     # every parameter exactly once
    by_id = {id(p): n for n, p in m.named_parameters()}
    for g in groups:
        assert [by_id[id(p)] for p in g["params"]] == g["names"]
        for name, p in zip(g["names"], g["params"]):
            assert g["lr_scale"] == pytest.approx(decay ** (L + 1 - ids[name]))
            no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    scales = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scales["head.weight"] == 1.0 and scales["blocks.2.attn.qkv.weight"] == pytest.approx(0.65)
    assert scales["pos_embed"] == pytest.approx(0.65 ** 4)


def test_layer_decay_groups_skip_frozen_and_apply_lr_scales():
    m = _tiny_vit(num_classes=2)
    for p in m.blocks[0].parameters():
        p.requires_grad_(False)
    groups = layer_decay_param_groups(m, 0.0, 0.5)
    names = {n for g in groups for n in g["names"]}
    assert not any(n.startswith("blocks.0.") for n in names) and "head.weight" in names
    opt = torch.optim.SGD(groups, lr=0.0)
    apply_lr(opt, 0.2)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.2 * 0.5 ** (4 - g["layer_id"]))


def test_layer_ids_hierarchical_models():
    # Swin: stage 1's patch merging goes with stage 1's first block; blocks numbered across stages
    swin = create_model("swin_tiny", num_classes=3, embed_dim=8, depths=(1, 2, 2), num_heads=(1, 1, 1),
                        window_size=2)
    ids = layer_ids(swin)
    assert num_layers(swin) == 5
    assert ids["patch_embed.proj.weight"] == 0
    assert {v for k, v in ids.items() if k.startswith("stages.0.blocks.0.")} == {1}
    assert {v for k, v in ids.items() if k.startswith("stages.1.downsample.")} == {2}
    assert {v for k, v in ids.items() if k.startswith("stages.1.blocks.1.")} == {3}
    assert {v for k, v in ids.items() if k.startswith("stages.2.blocks.1.")} == {5}
    assert ids["norm.weight"] == ids["head.weight"] == 6
    # CSWin: the stage-0 "downsample" is the conv stem
    cswin = create_model("cswin_tiny", embed_dim=8, depths=(1, 2, 1, 1))
    ids = layer_ids(cswin)
    assert ids["stages.0.downsample.conv.weight"] == 0 and ids["stages.1.downsample.conv.weight"] == 2
    assert ids["stages.3.downsample.conv.weight"] == 5 and ids["norm.weight"] == 6
    # keel hybrid: conv stages (Sequential) and transformer stages (.blocks), separate downsamples
    hyb = create_model("keel_tiny", img_size=32, widths=(8, 16, 32, 64), depths=(1, 2, 2, 1))
    ids = layer_ids(hyb)
    assert num_layers(hyb) == 6
    assert {v for k, v in ids.items() if k.startswith("stem.")} == {0}
    assert {v for k, v in ids.items() if k.startswith("stages.1.1.")} == {3}
    assert {v for k, v in ids.items() if k.startswith("downsamples.2.")} == {4}
    assert {v for k, v in ids.items() if k.startswith("stages.2.blocks.1.")} == {5}
    assert ids["norm.weight"] == 7
    # ResNet (no final norm) and ResNet-v2 (a block's own downsample stays in its block)
    r = create_model("resnet10_cifar", num_classes=4)
    ids = layer_ids(r)
    assert num_layers(r) == 4 and ids["stem.0.weight"] == 0 and ids["stages.2.0.shortcut.0.weight"] == 3
    assert ids["head.weight"] == 5
    r2 = create_model("resnetv2_26x1_cifar", stem_width=8, widths=(16, 16, 32, 32), gn_groups=4)
    ids = layer_ids(r2)
    assert ids["stages.1.0.downsample.weight"] == 3 and ids["stages.3.1.conv3.weight"] == 8
    assert ids["norm.weight"] == 9
    # module names too (drop-path placement); containers above the block level have none
    assert layer_id_of(r, "stages.1.0.bn1") == 2 and layer_id_of(r, "stages.1") is None
    assert layer_id_of(r, "") is None


def test_layer_ids_of_a_backbone_head_wrapper_and_unknown_parameters():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = create_model("resnet10_cifar")
            self.head = nn.Linear(256, 3)

    w = Wrapper()
    ids = layer_ids(w)
    assert ids["backbone.stem.0.weight"] == 0 and ids["backbone.stages.3.0.conv1.weight"] == 4
    assert ids["head.weight"] == 5 and num_layers(w) == 4

    m = _tiny_vit()
    m.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no layer id for parameter 'extra.weight'"):
        layer_ids(m)


def test_step_lr_hand_values():
    total, base = 100, 0.4
    assert step_lr(0, total, base, 4) == pytest.approx(0.1)       # warm-up as cosine_lr
    assert step_lr(3, total, base, 4) == pytest.approx(0.4)
    assert step_lr(29, total, base, 4) == pytest.approx(0.4)
    assert step_lr(30, total, base, 4) == pytest.approx(0.04)     # milestones at 30, 60, 90
    assert step_lr(59, total, base, 4) == pytest.approx(0.04)
    assert step_lr(60, total, base, 4) == pytest.approx(0.004)
    assert step_lr(90, total, base, 4) == pytest.approx(0.0004)
    assert step_lr(99, total, base, 4) == pytest.approx(0.0004)
    # custom milestones (rounded to steps) and factor
    assert step_lr(49, 99, 1.0, 0, milestones=[0.5], gamma=0.5) == pytest.approx(1.0)
    assert step_lr(50, 99, 1.0, 0, milestones=[0.5], gamma=0.5) == pytest.approx(0.5)


# ---------------------------------------------------------------- weight-decay schedule
from keel.engine.optim import cosine_wd  # noqa: E402


def test_cosine_wd_hand_values():
    start, end, total = 0.04, 0.4, 101        # steps 0..100, midway at step 50
    assert cosine_wd(0, total, start, end) == pytest.approx(start)
    assert cosine_wd(100, total, start, end) == pytest.approx(end)
    assert cosine_wd(50, total, start, end) == pytest.approx((start + end) / 2)
    # a quarter of the way: end + (start - end) * (1 + cos(pi / 4)) / 2, by hand
    assert cosine_wd(25, total, start, end) == pytest.approx(0.4 - 0.36 * (1 + math.sqrt(0.5)) / 2)
    assert cosine_wd(25, total, start, end) == pytest.approx(0.092721, abs=1e-6)
    ws = [cosine_wd(s, total, start, end) for s in range(total)]
    assert all(b >= a for a, b in zip(ws, ws[1:]))          # rises monotonically
    # a one-step run stays at the start value instead of dividing by zero
    assert cosine_wd(0, 1, start, end) == pytest.approx(start)
