"""keel.evaluate.fewshot: exact, seeded, nested shot sampling; per-draw results recomputed
independently and summarised exactly as numpy does."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from keel.config import FinetuneConfig, override
from keel.data.sources import build_dataset
from keel.evaluate.features import extract_features
from keel.evaluate.fewshot import _draw_seed, fewshot, fewshot_finetune_config, sample_shots
from keel.evaluate.frozen import make_eval_transform
from keel.evaluate.knn import knn_eval
from keel.evaluate.linear import linear_probe
from keel.jobs.finetune import finetune
from keel.models.registry import create_model
from keel.tasks.classify import ClassificationTask


def test_sample_shots_exact_seeded_and_nested():
    order = torch.randperm(25, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 9 + [-1] * 4)[order]
    draws = sample_shots(labels, 3, draws=4, seed=0)
    assert len(draws) == 4
    for idx in draws:
        assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)
        assert len(set(idx.tolist())) == len(idx) == 9
        assert torch.bincount(labels[idx], minlength=3).tolist() == [3, 3, 3]   # never an unlabeled one
    assert len({tuple(d.tolist()) for d in draws}) == 4                         # draws differ
    again = sample_shots(labels, 3, draws=4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(draws, again))                  # seeded
    assert not all(torch.equal(a, b) for a, b in zip(draws, sample_shots(labels, 3, draws=4, seed=1)))
    # draw d depends on (seed, d) only, and fewer shots are a subset of more shots
    assert torch.equal(sample_shots(labels, 3, draws=2, seed=0)[1], draws[1])
    for one, three in zip(sample_shots(labels, 1, draws=4, seed=0), draws):
        assert set(one.tolist()) <= set(three.tolist())


def test_sample_shots_errors_name_the_short_classes():
    labels = torch.tensor([0] * 7 + [1] * 2 + [2] * 9)
    with pytest.raises(ValueError, match="5-shot sampling needs 5 images of every class: class 1 has 2"):
        sample_shots(labels, 5, draws=1)
    with pytest.raises(ValueError, match="class 3 has 0"):
        sample_shots(labels, 1, draws=1, num_classes=4)     # a class with no image at all


def test_fewshot_per_draw_results_and_their_summary():
    train = build_dataset("digits", "train", 8, labeled=True)
    test = build_dataset("digits", "test", 8, labeled=True).subset(torch.arange(0, 360, 3))
    torch.manual_seed(0)
    backbone = create_model("resnet10_cifar")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    fcfg = fewshot_finetune_config(8, device="cpu", **{"train.epochs": 2, "train.warmup_epochs": 0.0,
                                                       "data.num_workers": 0})
    assert (fcfg.train.epochs, fcfg.train.warmup_epochs, fcfg.data.num_workers, fcfg.train.batch_size) == \
        (2, 0.0, 0, FinetuneConfig().train.batch_size)
    res = fewshot(backbone, train, test, shots=(1, 3), draws=3, knn_k=5, linear_epochs=10, finetune_cfg=fcfg, seed=7)

    assert set(res) == {"knn", "linear", "finetune"} and all(set(r) == {1, 3} for r in res.values())
    for by_shots in res.values():
        for summary in by_shots.values():
            v = np.asarray(summary["values"])
            assert len(v) == 3 and np.all((v >= 0) & (v <= 100))
            assert summary["mean"] == pytest.approx(np.mean(v))
            assert summary["std"] == pytest.approx(np.std(v, ddof=1))
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())   # never trained

    # every per-draw value, recomputed here from the same samples and seeds
    transform = make_eval_transform(8)
    xtr, ytr = extract_features(backbone, train, transform)
    xte, yte = extract_features(backbone, test, transform)
    for shots in (1, 3):
        for d, idx in enumerate(sample_shots(train.labels, shots, draws=3, seed=7)):
            k = min(5, len(idx))
            knn = knn_eval(xtr[idx], ytr[idx], xte, yte, ks=(k,), num_classes=10)[f"knn_top1@{k}"]
            assert res["knn"][shots]["values"][d] == pytest.approx(knn)
            seed = _draw_seed(7, d) % (1 << 31)
            lin = linear_probe(xtr[idx], ytr[idx], xte, yte, num_classes=10, epochs=10, seed=seed)
            assert res["linear"][shots]["values"][d] == pytest.approx(lin["linear_top1"])
            tuned = finetune(copy.deepcopy(backbone), train.subset(idx), test, override(fcfg, {"train.seed": seed}),
                             task=ClassificationTask(10, fcfg.task.label_smoothing), progress=False)
            assert res["finetune"][shots]["values"][d] == tuned["final"]["top1"]
    assert len({tuple(r["values"]) for r in res["knn"].values()}) == 2


def test_fewshot_rejects_unknown_protocols():
    train = build_dataset("digits", "train", 8, labeled=True)
    with pytest.raises(ValueError, match="unknown protocol"):
        fewshot(torch.nn.Identity(), train, train, protocols=("knn", "svm"))
