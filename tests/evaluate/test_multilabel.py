"""Tests for keel.evaluate.multilabel: losses and metrics against hand-computed values,
scikit-learn and timm; the two task heads; a short training on synthetic data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from keel.evaluate.multilabel import (
    AsymmetricLoss,
    MultiLabelTask,
    TwoLevelHead,
    TwoLevelTask,
    average_precision,
    bce_loss,
    f1_at,
    mean_average_precision,
)

sk_metrics = pytest.importorskip("sklearn.metrics")


def _random_case(seed: int, n: int = 40, c: int = 6, ties: bool = False):
    g = np.random.default_rng(seed)
    scores = g.integers(0, 4, (n, c)).astype(np.float64) if ties else g.normal(size=(n, c))
    targets = (g.random((n, c)) < 0.35).astype(np.float64)
    targets[:, 2] = 0.0  # a class with no positive
    targets[:, 5] = 1.0  # and one with no negative (AP 1)
    targets[0, 3], targets[1, 3] = 1.0, 0.0  # every other class has a positive and a negative
    return scores, targets


# ----------------------------------------------------------------------------
# metrics vs scikit-learn
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn(seed, ties):
    scores, targets = _random_case(seed, ties=ties)
    ap = average_precision(torch.tensor(scores), torch.tensor(targets))
    assert ap.shape == (6,)
    assert torch.isnan(ap[2])  # no positive: left out, not sklearn's 0
    expected = []
    for k in range(6):
        if k == 2:
            continue
        ref = sk_metrics.average_precision_score(targets[:, k], scores[:, k])
        assert float(ap[k]) == pytest.approx(ref, abs=1e-12)
        expected.append(ref)
    assert mean_average_precision(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(np.mean(expected))


def test_average_precision_hand_case_with_a_tie():
    # sorted scores 0.9(+) 0.8(-) 0.8(+) 0.1(-): thresholds 0.9 -> R 1/2, P 1; 0.8 -> R 1, P 2/3
    ap = average_precision(torch.tensor([[0.9], [0.8], [0.8], [0.1]]), torch.tensor([[1.0], [0.0], [1.0], [0.0]]))
    assert float(ap[0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_f1_matches_sklearn(threshold, zero_division):
    scores, targets = _random_case(3, ties=True)
    scores = scores / 2.0  # values 0, 0.5, 1, 1.5: ties exactly at the thresholds
    scores[:, 2] = -1.0  # the class without positives is never predicted either: F1 0/0
    preds = (scores >= threshold).astype(int)
    ours = f1_at(torch.tensor(scores), torch.tensor(targets), threshold, zero_division=zero_division)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for average in ("micro", "macro"):
            ref = sk_metrics.f1_score(targets, preds, average=average, zero_division=zero_division)
            assert ours[average] == pytest.approx(ref, abs=1e-12)


# ----------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_asymmetric_loss_hand_computed_2x2():
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def positive(x, gamma):  # -(1 - p)^gamma log p
        p = _sigmoid(x)
        return -((1 - p) ** gamma) * math.log(p)

    def negative(x, gamma, clip):  # -p_m^gamma log(1 - p_m), p_m = max(p - clip, 0)
        p_m = max(_sigmoid(x) - clip, 0.0)
        return -(p_m ** gamma) * math.log(1 - p_m)

    for gamma_pos, value in ((1.0, 3.010956425879148), (0.0, 3.267336164225813)):
        by_hand = (positive(2.0, gamma_pos) + negative(-1.0, 4, 0.05)
                   + negative(0.5, 4, 0.05) + positive(-3.0, gamma_pos))
        assert by_hand == pytest.approx(value, rel=1e-12)
        asl = AsymmetricLoss(gamma_neg=4, gamma_pos=gamma_pos, clip=0.05)
        assert float(asl(logits, targets)) == pytest.approx(value, rel=1e-6)
        mean = AsymmetricLoss(4, gamma_pos, 0.05, reduction="mean")
        assert float(mean(logits, targets)) == pytest.approx(value / 4, rel=1e-6)


def test_asymmetric_loss_without_focusing_or_clip_is_bce_times_n_c():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g, requires_grad=True)
    targets = (torch.rand(5, 7, generator=g) < 0.3).float()
    plain = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)
    # the reference sums over images and classes: N * C times the mean BCE
    summed = plain(logits, targets)
    torch.testing.assert_close(summed, 35 * bce_loss(logits, targets))
    (grad,) = torch.autograd.grad(summed, logits)
    (ref,) = torch.autograd.grad(35 * F.binary_cross_entropy_with_logits(logits, targets), logits)
    torch.testing.assert_close(grad, ref)
    mean = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0, reduction="mean")
    torch.testing.assert_close(mean(logits, targets), bce_loss(logits, targets))


def test_asymmetric_loss_matches_timm_and_discards_easy_negatives():
    timm_loss = pytest.importorskip("timm.loss")
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(8, 5, generator=g)).requires_grad_()
    targets = (torch.rand(8, 5, generator=g) < 0.4).float()
    for gamma_neg, gamma_pos, clip in ((4, 0, 0.05), (4, 1, 0.05), (2, 1, 0.0)):
        ours = AsymmetricLoss(gamma_neg, gamma_pos, clip)(logits, targets)
        ref = timm_loss.AsymmetricLossMultiLabel(gamma_neg, gamma_pos, clip, reduction="sum")(logits, targets)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])
    # a negative with p < clip adds nothing and gets no gradient
    x = torch.tensor([[-4.0]], requires_grad=True)  # p = 0.018 < 0.05
    loss = AsymmetricLoss()(x, torch.zeros(1, 1))
    assert float(loss.detach()) == 0.0 and float(torch.autograd.grad(loss, x)[0]) == 0.0
    # a confidently wrong positive keeps its gradient (no clamp at log(eps))
    x = torch.tensor([[-30.0]], requires_grad=True)
    loss = AsymmetricLoss()(x, torch.ones(1, 1))
    assert float(loss.detach()) == pytest.approx(30.0, rel=1e-6)
    assert float(torch.autograd.grad(loss, x)[0]) == pytest.approx(-1.0, rel=1e-6)


# ----------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------


def test_multilabel_task_loss_and_metrics():
    task = MultiLabelTask(3)
    head = task.head(4)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3
    logits = torch.tensor([[3.0, -2.0, -1.0], [-1.0, 1.0, -3.0], [1.0, 2.0, -2.0], [-2.0, -1.0, -4.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(task.loss(logits, targets), bce_loss(logits, targets))
    asl = MultiLabelTask(3, loss="asl")
    torch.testing.assert_close(asl.loss(logits, targets), AsymmetricLoss()(logits, targets) / 12)
    m = task.metrics(logits, targets)
    # class 0: positives ranked 1st and 2nd -> AP 1; class 1: positive at rank 2 (behind a negative) -> 1/2
    assert m["mAP"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert all(isinstance(v, float) for v in m.values())  # the task protocol: floats only
    assert m["ap/0"] == pytest.approx(100.0) and m["ap/1"] == pytest.approx(50.0) and math.isnan(m["ap/2"])
    assert m["classes_without_positives"] == 1.0
    assert task.per_class_ap(logits, targets) == pytest.approx([100.0, 50.0, None])
    named = MultiLabelTask(3, class_names=["cat", "dog", "bird"]).metrics(logits, targets)
    assert named["ap/dog"] == pytest.approx(50.0)
    assert "ap/0" not in MultiLabelTask(3, per_class=False).metrics(logits, targets)
    # predictions at p >= 0.5: cells (0,0), (1,1), (2,0), (2,1): TP 3, FP 1, FN 0
    assert m["micro_f1"] == pytest.approx(100 * 6 / 7)
    assert m["macro_f1"] == pytest.approx(100 * (1.0 + 2 / 3 + 0.0) / 3)
    assert task.main_metric == "mAP"


def test_two_level_head_conditions_secondary_on_primary():
    torch.manual_seed(0)
    head = TwoLevelHead(6, num_primary=3, num_secondary=5)
    x = torch.randn(4, 6)
    out = head(x)
    assert out.shape == (4, 8)
    # the secondary logits depend on the primary probabilities given...
    a = head.secondary_logits(x, torch.eye(3)[[0, 0, 0, 0]])
    b = head.secondary_logits(x, torch.eye(3)[[1, 1, 1, 1]])
    assert (a - b).abs().min() > 1e-4
    # ...and in forward, on the primary branch: changing only its weights moves them
    with torch.no_grad():
        head.primary.weight.add_(torch.randn_like(head.primary.weight))
    out2 = head(x)
    assert (out2[:, 3:] - out[:, 3:]).abs().max() > 1e-3
    # the secondary loss does not reach the primary branch (softmax detached)
    task = TwoLevelTask(3, 5)
    sec_only = F.cross_entropy(head(x)[:, 3:], torch.tensor([0, 1, 2, 3]))
    grads = torch.autograd.grad(sec_only, [head.primary.weight, head.secondary.weight], allow_unused=True)
    assert (grads[0] is None or not grads[0].any()) and grads[1].abs().sum() > 0
    targets = torch.tensor([[0, 1], [2, 4], [1, 0], [1, 3]])
    expected = F.cross_entropy(out2[:, :3], targets[:, 0]) + F.cross_entropy(out2[:, 3:], targets[:, 1])
    torch.testing.assert_close(task.loss(out2, targets), expected)


def test_two_level_metrics_and_hierarchy_masking():
    # primaries: 0 -> {0, 1}, 1 -> {2}, 2 -> {} (no listed child: unrestricted)
    task = TwoLevelTask(3, 4, hierarchy={0: [0, 1], 1: {2}})
    outputs = torch.tensor([
        # primary logits | secondary logits
        [5.0, 0.0, 0.0, 1.0, 0.0, 9.0, 0.0],   # primary 0; raw best secondary 2 is not under 0 -> 0
        [0.0, 5.0, 0.0, 9.0, 0.0, 1.0, 0.0],   # primary 1; only 2 allowed
        [0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 9.0],   # primary 2 has no listed child: raw argmax 3
        [0.0, 5.0, 0.0, 0.0, 9.0, 1.0, 0.0],   # primary 1 (wrong) -> secondary 2 (wrong)
    ])
    p, s = task.predict(outputs)
    assert p.tolist() == [0, 1, 2, 1] and s.tolist() == [0, 2, 3, 2]
    assert TwoLevelTask(3, 4).predict(outputs)[1].tolist() == [2, 0, 3, 1]  # no hierarchy: no masking
    targets = torch.tensor([[0, 0], [1, 2], [2, 1], [0, 1]])
    m = task.metrics(outputs, targets)
    assert m == pytest.approx({"primary_top1": 75.0, "secondary_top1": 50.0, "both_top1": 50.0,
                               "secondary_top1_given_primary": 100 * 2 / 3})
    assert task.main_metric == "both_top1"
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, :2] = mask[1, 2] = True
    assert torch.equal(TwoLevelTask(3, 4, hierarchy=mask).mask, task.mask)
    with pytest.raises(ValueError, match="more than one primary"):
        TwoLevelTask(3, 4, hierarchy={0: [0, 1], 1: [1]})


# ----------------------------------------------------------------------------
# a short training on fixed synthetic features
# ----------------------------------------------------------------------------


def _fit(task, x, y, steps=150, lr=0.05):
    torch.manual_seed(0)
    head = task.head(x.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(head(x), y).backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        return head


@pytest.mark.parametrize("loss", ["bce", "asl"])
def test_multilabel_head_learns_on_random_features(loss):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 12, generator=g)
    w = torch.randn(12, 5, generator=g)
    y = ((x @ w) > 0.5).float()  # each label a half-space of the features, prevalence about 1/3
    train, test = slice(0, 400), slice(400, 600)
    task = MultiLabelTask(5, loss=loss)
    head = _fit(task, x[train], y[train])
    with torch.no_grad():
        m = task.metrics(head(x[test]), y[test])
    chance = 100 * float(y[test].mean())  # mAP of random scores is about the prevalence
    assert chance < 45 and m["mAP"] > 90 and m["micro_f1"] > 75


def test_two_level_head_learns_on_random_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 10, generator=g)
    primary = (x @ torch.randn(10, 3, generator=g)).argmax(1)
    side = (x @ torch.randn(10, generator=g) > 0).long()
    y = torch.stack([primary, 2 * primary + side], dim=1)  # secondaries {0,1} | {2,3} | {4,5}
    task = TwoLevelTask(3, 6, hierarchy={p: [2 * p, 2 * p + 1] for p in range(3)})
    head = _fit(task, x[:600], y[:600], steps=200)
    with torch.no_grad():
        m = task.metrics(head(x[600:]), y[600:])
    assert m["primary_top1"] > 85 and m["both_top1"] > 75  # chance: 33 and 17


# ----------------------------------------------------------------------------
# end to end: keel's fine-tuning loop with these tasks
# ----------------------------------------------------------------------------


class _DigitsWith:
    """In-memory digits (8 px) with other targets: ``images`` and ``labels`` are all the loop reads."""

    def __init__(self, split: str, n: int, targets):
        from keel.data.sources import build_dataset

        ds = build_dataset("digits", split, img_size=8)
        self.images = ds.images[:n]
        self.labels = targets(ds.labels[:n])

    def __len__(self) -> int:
        return len(self.images)


def _multi_hot(digit):
    # 11 labels: the digit itself, and "digit >= 5"
    y = F.one_hot(digit, 10).float()
    return torch.cat([y, (digit >= 5).float().unsqueeze(1)], dim=1)


def _finetune_cfg(values: dict | None = None):
    from keel.config import FinetuneConfig, override

    base = {"data.img_size": 8, "train.epochs": 2, "train.batch_size": 64, "train.warmup_epochs": 0.2,
            "train.lr": 4e-2, "train.device": "cpu", "data.num_workers": 0, "model.drop_path_rate": 0.0,
            "train.eval_every": 0, "train.seed": 0}
    return override(FinetuneConfig(), {**base, **(values or {})})


def test_finetune_multilabel_digits_beats_chance():
    from keel.jobs.finetune import finetune
    from keel.models.registry import create_model

    train, test = _DigitsWith("train", 512, _multi_hot), _DigitsWith("test", 200, _multi_hot)
    torch.manual_seed(0)
    backbone = create_model("resnet10_cifar", img_size=8)
    result = finetune(backbone, train, test, _finetune_cfg(), task=MultiLabelTask(11), progress=False)
    final = result["final"]
    chance = 100 * float(test.labels.mean(0).mean())  # random scores: AP about the prevalence, 13.6 here
    assert result["main_metric"] == "mAP"
    assert final["mAP"] > chance + 10  # measured 48 after 16 steps (seeds 0-2: 28-48)
    assert final["ap/10"] > 100 * float(test.labels[:, 10].mean()) + 5


def test_finetune_two_level_runs_through_the_loop():
    from keel.jobs.finetune import finetune
    from keel.models.registry import create_model

    pairs = lambda d: torch.stack([(d >= 5).long(), d], dim=1)  # noqa: E731
    train, test = _DigitsWith("train", 256, pairs), _DigitsWith("test", 100, pairs)
    task = TwoLevelTask(2, 10, hierarchy={0: range(5), 1: range(5, 10)})
    torch.manual_seed(0)
    backbone = create_model("resnet10_cifar", img_size=8)
    result = finetune(backbone, train, test, _finetune_cfg({"task.mode": "linear", "train.epochs": 1}), task=task,
                      progress=False)
    final = result["final"]
    assert result["main_metric"] == "both_top1"
    # with the hierarchy mask a right secondary implies a right primary: both == secondary
    assert final["both_top1"] == final["secondary_top1"] <= final["primary_top1"]
