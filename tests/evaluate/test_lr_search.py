"""The lr search before fine-tuning: the held-out split (counts worked by hand), the choice (each
candidate's score equals finetune() run directly on the same split), the final run on every
training image, recipe=bit asking for it, resuming a stopped search, and the one-line errors."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import keel.evaluate.finetune as ft
from keel.config import ConfigError, load_config
from keel.data.sources import build_dataset
from keel.evaluate.finetune import FinetuneConfig, bit_recipe, finetune, load_for_finetune, run_finetune
from keel.evaluate.lr_search import BIT_LR_GRID, holdout_split, search_lr


@pytest.fixture(scope="module")
def digits8():
    return build_dataset("digits", "train", 8, labeled=True)


def _cfg(**kw):
    base = dict(backbone="random:resnetv2_14_tiny_cifar", source="digits", img_size=8, epochs=1, batch_size=256,
                warmup_epochs=0.0, optimizer="sgd", schedule="step", device="cpu", num_workers=0,
                drop_path_rate=0.0, lr_search=[0.001, 0.3])
    return FinetuneConfig(**{**base, **kw})


def test_holdout_is_the_fraction_of_every_class(digits8):
    fit, held = holdout_split(digits8, 0.2, seed=3)
    labels = digits8.labels
    for c in range(10):
        n_c = int((labels == c).sum())
        assert int((held.labels == c).sum()) == round(0.2 * n_c)
        assert int((fit.labels == c).sum()) == n_c - round(0.2 * n_c)
    assert len(fit) + len(held) == len(digits8)
    # the same images as the dataset's, each in exactly one part: compare the pixels as a multiset
    rows = lambda ds: sorted(map(tuple, ds.images.flatten(1).tolist()))
    assert sorted(rows(fit) + rows(held)) == rows(digits8)
    again = holdout_split(digits8, 0.2, seed=3)[1]
    assert torch.equal(again.images, held.images)
    assert not torch.equal(holdout_split(digits8, 0.2, seed=4)[1].images, held.images)


def test_holdout_never_takes_a_class_last_image(digits8):
    # class 0 cut to one image, class 1 to two: one stays for training, one of two is held out
    labels = digits8.labels
    keep = torch.cat([(labels == 0).nonzero()[:1, 0], (labels == 1).nonzero()[:2, 0], (labels >= 2).nonzero()[:, 0]])
    ds = digits8.subset(keep.sort().values)
    fit, held = holdout_split(ds, 0.2)
    assert int((fit.labels == 0).sum()) == 1 and int((held.labels == 0).sum()) == 0
    assert int((fit.labels == 1).sum()) == 1 and int((held.labels == 1).sum()) == 1


def test_holdout_errors():
    ds = build_dataset("digits", "train", 8, labeled=True)
    with pytest.raises(ConfigError, match="fraction"):
        holdout_split(ds, 1.0)
    with pytest.raises(ConfigError, match="too few"):
        holdout_split(ds.subset(torch.tensor([0])), 0.5)


def test_search_scores_equal_direct_runs_and_the_best_is_chosen(digits8, tmp_path):
    cfg = _cfg()
    chosen, record = search_lr(cfg, digits8, None, tmp_path, progress=False)
    fit, held = holdout_split(digits8, cfg.lr_search_holdout, cfg.seed)
    direct = {}
    for lr in cfg.lr_search:
        res = finetune(load_for_finetune(cfg.backbone, 8, seed=cfg.seed), fit, held,
                       replace(cfg, lr=lr, lr_search=[], eval_every=0), progress=False)
        direct[f"{lr:g}"] = res["final"]["top1"]
    assert record["scores"] == pytest.approx(direct, abs=1e-9)
    assert record["holdout"] == len(held) and record["metric"] == "top1"
    best = max(cfg.lr_search, key=lambda v: direct[f"{v:g}"])
    assert direct["0.3"] != direct["0.001"]           # the two lrs lead to different models
    assert chosen.lr == best and record["chosen"] == best and chosen.lr_search == []
    saved = json.loads((tmp_path / "lr-search" / "scores.json").read_text())
    assert saved == json.loads(json.dumps(record))
    # each candidate was scored on the held-out images, never the test split
    for key in direct:
        assert json.loads((tmp_path / "lr-search" / f"lr{key}" / "result.json").read_text())["test_images"] == len(held)
        # scored, so its resumable state is gone; its classifier stays
        assert not (tmp_path / "lr-search" / f"lr{key}" / "checkpoints").exists()
        assert (tmp_path / "lr-search" / f"lr{key}" / "classifier.safetensors").is_file()


def test_ties_go_to_the_smaller_lr(digits8, tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: {"main_metric": "top1", "final": {"top1": 50.0}})
    chosen, _ = search_lr(_cfg(lr_search=[0.1, 0.01, 0.03]), digits8, None, tmp_path, progress=False)
    assert chosen.lr == 0.01


def test_run_finetune_trains_the_chosen_lr_on_every_image(tmp_path):
    cfg = _cfg()
    res = run_finetune(cfg, tmp_path / "run", progress=False)
    chosen = res["lr_search"]["chosen"]
    assert chosen in cfg.lr_search
    saved = load_config(tmp_path / "run" / "config.yaml", cls=FinetuneConfig)
    assert saved.lr == chosen and saved.lr_search == []
    assert res["train_images"] == 1437 and res["test_images"] == 360
    # the final run is the plain run with that lr
    plain = run_finetune(replace(cfg, lr=chosen, lr_search=[]), tmp_path / "plain", progress=False)
    assert res["final"] == plain["final"]


class _Stop(Exception):
    pass


def test_a_stopped_search_resumes_without_redoing_scored_candidates(tmp_path, monkeypatch):
    cfg = _cfg(lr_search=[0.001, 0.01, 0.3])
    whole = run_finetune(cfg, tmp_path / "whole", progress=False)
    calls, real, stopped = [], ft.finetune, []

    def crash_on_second(*args, **kwargs):
        calls.append(kwargs.get("run_dir"))
        if len(calls) == 2 and not stopped:
            stopped.append(True)
            raise _Stop
        return real(*args, **kwargs)
    monkeypatch.setattr(ft, "finetune", crash_on_second)
    with pytest.raises(_Stop):
        run_finetune(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()          # the final run had not started
    calls.clear()
    res = run_finetune(None, tmp_path / "run", resume=True, progress=False)
    # lr 0.001 was scored before the stop: only 0.01, 0.3 and the final run train now
    assert [p.name for p in calls] == ["lr0.01", "lr0.3", "run"]
    assert res["lr_search"] == whole["lr_search"] and res["final"] == whole["final"]


def test_recipe_bit_asks_for_the_search_unless_lr_is_set():
    cfg = bit_recipe(FinetuneConfig(source="digits", recipe="bit", recipe_max_side=8), progress=False)
    assert cfg.lr is None and cfg.lr_search == pytest.approx([v / 2 for v in BIT_LR_GRID])
    assert 0.0015 in cfg.lr_search                      # BiT's own 0.003 per 512 is a candidate
    mine = bit_recipe(FinetuneConfig(source="digits", recipe="bit", recipe_max_side=8, lr=0.02), progress=False)
    assert mine.lr == 0.02 and mine.lr_search == []
    listed = bit_recipe(FinetuneConfig(source="digits", recipe="bit", recipe_max_side=8, lr_search=[0.1, 0.2]),
                        progress=False)
    assert listed.lr is None and listed.lr_search == [0.1, 0.2]


def test_config_errors(digits8):
    with pytest.raises(ConfigError, match="not both"):
        run_finetune(_cfg(lr=0.01), progress=False)
    with pytest.raises(ConfigError, match="> 0"):
        run_finetune(_cfg(lr_search=[0.01, 0.0]), progress=False)
    with pytest.raises(ConfigError, match="lr_search_holdout"):
        run_finetune(_cfg(lr_search_holdout=0.0), progress=False)
    with pytest.raises(ConfigError, match="run_finetune"):
        finetune(load_for_finetune("random:resnetv2_14_tiny_cifar", 8), digits8, digits8, _cfg(), progress=False)
