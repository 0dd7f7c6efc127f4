"""The lr search before fine-tuning: the held-out split (counts worked by hand), the choice (each
candidate's score equals finetune() run directly on the same split), the final run on every
training image, recipe=bit asking for it, resuming a stopped search, and the one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

import keel.jobs.finetune as ft
from keel import hub
from keel.config import ConfigError, FinetuneConfig, load_config, override
from keel.data.sources import build_dataset
from keel.jobs.finetune import finetune, run_finetune
from keel.recipes.lr_search import BIT_LR_GRID, holdout_split, search_lr
from keel.recipes.supervised import bit_recipe


@pytest.fixture(scope="module")
def digits8():
    return build_dataset("digits", "train", 8, labeled=True)


def _cfg(values: dict | None = None) -> FinetuneConfig:
    base = {"model.backbone": "random:resnetv2_14_tiny_cifar", "data.source": "digits", "data.img_size": 8,
            "train.epochs": 1, "train.batch_size": 256, "train.warmup_epochs": 0.0, "train.optimizer": "sgd",
            "train.schedule": "step", "train.device": "cpu", "data.num_workers": 0, "model.drop_path_rate": 0.0,
            "recipe.lr_search": [0.001, 0.3]}
    return override(FinetuneConfig(), {**base, **(values or {})})


def _backbone(cfg):
    return hub.resolve_backbone(cfg.model.backbone, cfg.data.img_size, seed=cfg.train.seed)[0]


def _fit(cfg, fit, held, objective, run_dir, resume):
    """search_lr's fit_fn: a fresh backbone fine-tuned with the candidate's config (as run_finetune's)."""
    return finetune(_backbone(cfg), fit, held, cfg, task=objective, run_dir=run_dir, progress=False, resume=resume)


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
    chosen, record = search_lr(cfg, digits8, None, tmp_path, _fit, progress=False)
    fit, held = holdout_split(digits8, cfg.recipe.lr_search_holdout, cfg.train.seed)
    direct = {}
    for lr in cfg.recipe.lr_search:
        one = override(cfg, {"train.lr": lr, "recipe.lr_search": [], "train.eval_every": 0})
        res = finetune(_backbone(cfg), fit, held, one, progress=False)
        direct[f"{lr:g}"] = res["final"]["top1"]
    assert record["scores"] == pytest.approx(direct, abs=1e-9)
    assert record["holdout"] == len(held) and record["metric"] == "top1"
    best = max(cfg.recipe.lr_search, key=lambda v: direct[f"{v:g}"])
    assert direct["0.3"] != direct["0.001"]           # the two lrs lead to different models
    assert chosen.train.lr == best and record["chosen"] == best and chosen.recipe.lr_search == []
    saved = json.loads((tmp_path / "lr-search" / "scores.json").read_text())
    assert saved == json.loads(json.dumps(record))
    # each candidate was scored on the held-out images, never the test split
    for key in direct:
        assert json.loads((tmp_path / "lr-search" / f"lr{key}" / "result.json").read_text())["test_images"] == len(held)
        # scored, so its resumable state is gone; its classifier stays
        assert not (tmp_path / "lr-search" / f"lr{key}" / "checkpoints").exists()
        assert (tmp_path / "lr-search" / f"lr{key}" / "classifier.safetensors").is_file()


def test_ties_go_to_the_smaller_lr(digits8, tmp_path, monkeypatch):
    def tie(*args):
        return {"main_metric": "top1", "final": {"top1": 50.0}}

    chosen, _ = search_lr(_cfg({"recipe.lr_search": [0.1, 0.01, 0.03]}), digits8, None, tmp_path, tie,
                          progress=False)
    assert chosen.train.lr == 0.01


def test_run_finetune_trains_the_chosen_lr_on_every_image(tmp_path):
    cfg = _cfg()
    res = run_finetune(cfg, tmp_path / "run", progress=False)
    chosen = res["lr_search"]["chosen"]
    assert chosen in cfg.recipe.lr_search and res["lr"] == chosen
    saved = load_config(tmp_path / "run" / "config.yaml", cls=FinetuneConfig)
    assert saved.train.lr == chosen and saved.recipe.lr_search == []
    assert res["train_images"] == 1437 and res["test_images"] == 360
    # the final run is the plain run with that lr
    plain = run_finetune(override(cfg, {"train.lr": chosen, "recipe.lr_search": []}), tmp_path / "plain",
                         progress=False)
    assert res["final"] == plain["final"]


class _Stop(Exception):
    pass


def test_a_stopped_search_resumes_without_redoing_scored_candidates(tmp_path, monkeypatch):
    cfg = _cfg({"recipe.lr_search": [0.001, 0.01, 0.3]})
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
    train = build_dataset("digits", "train", 8, labeled=True)
    base = override(FinetuneConfig(), {"data.source": "digits", "recipe.name": "bit", "recipe.max_side": 8})
    cfg = bit_recipe(base, train, progress=False)
    assert cfg.train.lr is None and cfg.recipe.lr_search == pytest.approx([v / 2 for v in BIT_LR_GRID])
    assert 0.0015 in cfg.recipe.lr_search                      # BiT's own 0.003 per 512 is a candidate
    mine = bit_recipe(override(base, {"train.lr": 0.02}), train, progress=False)
    assert mine.train.lr == 0.02 and mine.recipe.lr_search == []
    listed = bit_recipe(override(base, {"recipe.lr_search": [0.1, 0.2]}), train, progress=False)
    assert listed.train.lr is None and listed.recipe.lr_search == [0.1, 0.2]


def test_config_errors(digits8):
    with pytest.raises(ConfigError, match="not both"):
        run_finetune(_cfg({"train.lr": 0.01}), progress=False)
    with pytest.raises(ConfigError, match="> 0"):
        run_finetune(_cfg({"recipe.lr_search": [0.01, 0.0]}), progress=False)
    with pytest.raises(ConfigError, match="lr_search_holdout"):
        run_finetune(_cfg({"recipe.lr_search_holdout": 0.0}), progress=False)
    with pytest.raises(ConfigError, match="run_finetune"):
        finetune(_backbone(_cfg()), digits8, digits8, _cfg(), progress=False)
