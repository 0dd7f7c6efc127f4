"""keel.tasks.distill: DeiT's hard and soft distillation losses by hand, teachers from a
finetune run, timm weights and random init, and distillation inside finetune (a distilled DeiT
student with the DeiT recipe; the teacher sees the student's mixed batch, frozen, in eval mode)."""
from __future__ import annotations

import json

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from keel import hub
from keel.config import FinetuneConfig, load_config, override
from keel.data.sources import build_dataset
from keel.engine.checkpoint import export_backbone
from keel.jobs.finetune import finetune
from keel.models.classifier import Classifier, DistilledHead
from keel.models.registry import create_model
from keel.tasks.distill import distillation_loss

DEIT_KWARGS = dict(img_size=8, patch_size=2, depth=2, dim=48, num_heads=3)


@pytest.fixture(scope="module")
def digits8():
    train = build_dataset("digits", "train", 8, labeled=True)
    test = build_dataset("digits", "test", 8, labeled=True)
    return train.subset(torch.arange(192)), test.subset(torch.arange(128))


@pytest.fixture(scope="module")
def teacher_run(digits8, tmp_path_factory):
    """A resnet10 classifier fine-tuned for an epoch, saved as the CLI does (config.yaml names its
    backbone spec): (run directory, result)."""
    train, test = digits8
    run = tmp_path_factory.mktemp("teacher")
    cfg = _cfg({"model.backbone": "random:resnet10_cifar", "train.lr": 3e-2, "train.seed": 4})
    backbone, _ = hub.resolve_backbone(cfg.model.backbone, 8, seed=cfg.train.seed)
    res = finetune(backbone, train, test, cfg, run_dir=run, progress=False)
    return run, res


def _cfg(values: dict | None = None) -> FinetuneConfig:
    base = {"data.img_size": 8, "train.epochs": 1, "train.batch_size": 48, "train.warmup_epochs": 0.0,
            "train.device": "cpu", "data.num_workers": 0}
    return override(FinetuneConfig(), {**base, **(values or {})})


def _deit(seed=0):
    torch.manual_seed(seed)
    return create_model("deit_tiny_distilled_patch16", **DEIT_KWARGS)


def _teacher(spec, num_classes, img_size, seed=0):
    return hub.resolve_classifier(spec, num_classes, img_size, seed=seed)


def _log_softmax(z):
    return z - z.exp().sum(1, keepdim=True).log()


def test_hard_distillation_is_ce_to_the_teachers_argmax_by_hand():
    g = torch.Generator().manual_seed(0)
    cls_out, dist_out, teacher = (torch.randn(4, 3, generator=g) for _ in range(3))
    y = torch.tensor([0, 2, 1, 1])
    out = distillation_loss((cls_out, dist_out), teacher, y, "hard", alpha=0.5)
    t_label = teacher.argmax(1)
    hand_distill = -_log_softmax(dist_out)[torch.arange(4), t_label].mean()
    hand_base = -_log_softmax(cls_out)[torch.arange(4), y].mean()
    torch.testing.assert_close(out["distill_loss"], hand_distill)
    torch.testing.assert_close(out["base_loss"], hand_base)
    torch.testing.assert_close(out["loss"], 0.5 * hand_base + 0.5 * hand_distill)   # DeiT's 1/2 + 1/2
    out = distillation_loss((cls_out, dist_out), teacher, y, "hard", alpha=0.8)
    torch.testing.assert_close(out["loss"], 0.2 * hand_base + 0.8 * hand_distill)
    # one head (no distillation token): both terms on it
    one = distillation_loss(cls_out, teacher, y, "hard", alpha=0.5)
    torch.testing.assert_close(one["distill_loss"], -_log_softmax(cls_out)[torch.arange(4), t_label].mean())
    none = distillation_loss(cls_out, None, y, "none")
    torch.testing.assert_close(none["loss"], hand_base)


def test_soft_distillation_is_deits_kl_by_hand_with_tau_scaling():
    g = torch.Generator().manual_seed(1)
    cls_out, dist_out, teacher = (torch.randn(5, 4, generator=g) for _ in range(3))
    dist_out.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 0])
    smooth = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)   # noqa: E731
    for tau in (1.0, 2.0, 4.0):
        out = distillation_loss((cls_out, dist_out), teacher, y, "soft", tau=tau, alpha=0.3, base_loss=smooth)
        p_t, log_p_t, log_p_s = (teacher / tau).softmax(1), _log_softmax(teacher / tau), _log_softmax(dist_out / tau)
        # sum over the batch and classes of KL(teacher || student), x tau^2, / (batch x classes)
        hand = (p_t * (log_p_t - log_p_s)).sum() * tau * tau / dist_out.numel()
        torch.testing.assert_close(out["distill_loss"], hand)
        torch.testing.assert_close(out["base_loss"], smooth(cls_out, y))
        torch.testing.assert_close(out["loss"], 0.7 * smooth(cls_out, y) + 0.3 * hand)
    # a student equal to the teacher has zero distillation loss; gradients reach the student only
    same = distillation_loss(teacher.clone(), teacher, y, "soft", tau=2.0)
    assert same["distill_loss"].abs() < 1e-6
    t = teacher.clone().requires_grad_(True)
    distillation_loss((cls_out, dist_out), t, y, "soft")["loss"].backward()
    assert t.grad is None and dist_out.grad is not None
    with pytest.raises(ValueError, match="same classes"):
        distillation_loss(cls_out, torch.randn(5, 7), y, "soft")


def test_distilled_head_pairs_in_training_and_averages_in_eval():
    from keel.engine.optim import layer_decay_param_groups, num_layers
    backbone = _deit()
    model = Classifier(backbone, DistilledHead(nn.Linear(48, 10), nn.Linear(48, 10)))
    x = torch.randn(3, 3, 8, 8)
    a, b = model.train()(x)
    tokens = backbone.forward_tokens(x)
    torch.testing.assert_close(a, model.head.cls(tokens[:, 0]))
    torch.testing.assert_close(b, model.head.dist(tokens[:, 1]))
    torch.testing.assert_close(model.eval()(x), (a + b) / 2)
    groups = layer_decay_param_groups(model, 0.05, 0.5)                    # both heads at the top layer id
    top = {n for g in groups for n in g["names"] if g["layer_id"] == num_layers(backbone) + 1}
    assert {"head.cls.weight", "head.dist.weight"} <= top
    with pytest.raises(ValueError, match="distillation token"):
        Classifier(hub.resolve_backbone("random:resnet10_cifar", 8)[0],
                   DistilledHead(nn.Linear(256, 2), nn.Linear(256, 2)))


def test_teachers_from_a_finetune_run_timm_weights_and_random(teacher_run, tmp_path):
    run, res = teacher_run
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        want = res["classifier"].eval()(x)
    for spec in (run, run / "classifier.safetensors", run / "classifier_best.safetensors"):
        teacher = _teacher(str(spec), 10, 8)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        torch.testing.assert_close(teacher(x), want)
    with pytest.raises(ValueError, match="10 classes, the data has 7"):
        _teacher(str(run), 7, 8)

    # random: seeded, with a head of the data's classes
    r1, r2 = _teacher("random:resnet10_cifar", 10, 8, seed=1), _teacher("random:resnet10_cifar", 10, 8, seed=1)
    torch.testing.assert_close(r1(x), r2(x))
    assert r1(x).shape == (6, 10)

    # a pretraining run (head-less backbone) is not a teacher
    export_backbone(create_model("resnet10_cifar"), tmp_path / "pre", {"model": "resnet10_cifar", "model_kwargs": {}})
    with pytest.raises(ValueError, match="without a classifier head"):
        _teacher(str(tmp_path / "pre"), 10, 8)

    # timm classifier weights with their head: same logits as timm
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    torch.manual_seed(0)
    tm = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=16, num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, tmp_path / "deit.safetensors")
    teacher = _teacher(f"timm:deit_tiny_distilled_patch16_224:{tmp_path / 'deit.safetensors'}", 10, 16)
    x16 = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x16), tm(x16), rtol=1e-4, atol=1e-5)


class _SpyTeacher(nn.Module):
    """Always predicts class 3; records what it was fed and how."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.0, 0.0, 0.0, 5.0, 0, 0, 0, 0, 0, 0]))
        self.calls = []

    def forward(self, x):
        self.calls.append((x.clone(), self.training, torch.is_grad_enabled()))
        return self.logits.expand(len(x), -1)


def test_distillation_in_finetune_follows_the_teacher_on_the_students_mixed_batch(digits8, tmp_path):
    train, test = digits8
    student = _deit()
    seen = []
    student.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    teacher = _SpyTeacher()
    # alpha = 1: the labels play no part, the distillation token's head learns the teacher's class
    cfg = _cfg({"train.epochs": 4, "train.lr": 5e-3, "recipe.name": "deit", "distill.kind": "hard",
                "distill.alpha": 1.0, "train.warmup_epochs": 0.0})
    res = finetune(student, train, test, cfg, teacher=teacher, run_dir=tmp_path / "spy", progress=False)
    clf = res["classifier"]
    # the teacher is scored on the test split first (said and recorded): it always says 3
    always_3 = 100.0 * (test.labels == 3).float().mean().item()
    assert isinstance(clf.head, DistilledHead) and res["distill"]["kind"] == "hard"
    assert res["distill"]["teacher"] == "(a module)" and res["distill"]["teacher_top1"] == pytest.approx(always_3)
    n_eval = math.ceil(len(test) / 256)
    assert len(teacher.calls) == n_eval + res["steps"] and res["steps"] == 4 * 4
    # then in training it got the student's exact input (after Mixup/CutMix), in eval mode, without autograd
    assert all(any(torch.equal(x, s) for s in seen) for x, _, _ in teacher.calls[n_eval:])
    assert all(not training and not grad for _, training, grad in teacher.calls)
    from keel.evaluate.frozen import make_eval_transform
    clf.eval()                      # finetune returns its classifier as training left it (train mode)
    with torch.no_grad():
        tokens = clf.backbone.forward_tokens(make_eval_transform(8)(test.images[:64]))
        assert (clf.head.dist(tokens[:, 1]).argmax(1) == 3).all()
    # a run made from a module names no backbone spec: its classifier cannot be rebuilt
    with pytest.raises(ValueError, match="names no backbone"):
        _teacher(str(tmp_path / "spy"), 10, 8)


def test_finetune_with_the_deit_recipe_and_a_run_dir_teacher_logs_distill_loss(digits8, teacher_run, tmp_path):
    train, test = digits8
    # the student's backbone as a pretraining run, so that its config.yaml names a spec that rebuilds it
    pre = tmp_path / "pre"
    export_backbone(_deit(), pre, {"model": "deit_tiny_distilled_patch16", "model_kwargs": DEIT_KWARGS})
    cfg = _cfg({"train.epochs": 2, "recipe.name": "deit", "model.backbone": str(pre),
                "distill.teacher": str(teacher_run[0]), "distill.kind": "soft", "distill.tau": 2.0,
                "train.model_ema": 0.9})
    student, _ = hub.resolve_backbone(str(pre), 8)
    res = finetune(student, train, test, cfg, run_dir=tmp_path / "student", progress=False)
    lines = [json.loads(s) for s in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in lines if "loss" in r]
    assert [r["step"] for r in trains] == [4, 8]                  # each epoch's end: 4 steps of 48 images
    for rec in trains:
        assert rec["distill_loss"] > 0 and rec["base_loss"] > 0
        assert rec["loss"] == pytest.approx(0.5 * rec["base_loss"] + 0.5 * rec["distill_loss"], rel=1e-5)
    # each epoch evaluated, the model and its EMA
    assert [r["epoch"] for r in lines if "top1" in r] == [1, 2]
    assert [r["epoch"] for r in lines if "ema_top1" in r] == [1, 2]
    saved = json.loads((tmp_path / "student" / "result.json").read_text())
    assert saved["recipe"] == "deit" and saved["distill"]["kind"] == "soft"
    assert saved["distill"]["teacher"] == str(teacher_run[0])
    # the teacher's score on the test split is its own run's final one (the same weights, the same images)
    assert saved["distill"]["teacher_top1"] == pytest.approx(teacher_run[1]["final"]["top1"])
    assert saved["best_ema"]["epoch"] in (1, 2)
    assert "distill_loss" not in saved["final"] and "ema_top1" in saved["final"]
    used = load_config(tmp_path / "student" / "config.yaml", cls=FinetuneConfig)
    assert (used.aug.mixup, used.aug.cutmix, used.aug.reprob, used.train.repeated_aug, used.aug.randaugment) == \
        (0.8, 1.0, 0.25, 3, "rand-m9-mstd0.5-inc1")
    assert (tmp_path / "student" / "classifier_ema.safetensors").is_file()
    # the student's saved classifier (two heads, averaged in eval) reloads into its architecture
    again = _teacher(str(tmp_path / "student" / "classifier_ema.safetensors"), 10, 8)
    assert isinstance(again.head, DistilledHead) and not again.training
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(again(x), res["ema_classifier"](x))
