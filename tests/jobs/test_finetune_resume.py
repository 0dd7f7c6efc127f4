"""Resuming keel finetune: a run stopped after epoch 2 of 3 and resumed ends bit-identical to an
unbroken run (weights, metrics.jsonl, classifier files, result), a finished run is not trained again,
the CLI's --resume, and the one-line errors for a damaged checkpoint or extra arguments."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import keel.jobs.finetune as ft
from keel import hub
from keel.cli import main
from keel.config import ConfigError, FinetuneConfig, override
from keel.data.sources import build_dataset
from keel.errors import TrainingError
from keel.jobs.finetune import finetune
from keel.tasks.classify import SupervisedTask


@pytest.fixture(scope="module")
def digits8():
    return build_dataset("digits", "train", 8, labeled=True), build_dataset("digits", "test", 8, labeled=True)


def _cfg(values: dict | None = None) -> FinetuneConfig:
    # warm-up over 1.5 epochs and drop-path on: the lr of a resumed step and the drop-path draws
    # (the torch RNG) must both continue where they were
    base = {"model.backbone": "random:resnet10_cifar", "data.source": "digits", "data.img_size": 8,
            "train.epochs": 3, "train.batch_size": 64, "train.warmup_epochs": 1.5, "train.device": "cpu",
            "data.num_workers": 0, "model.drop_path_rate": 0.1}
    return override(FinetuneConfig(), {**base, **(values or {})})


def _resnet(seed=0):
    return hub.resolve_backbone("random:resnet10_cifar", 8, seed=seed)[0]


class _Crash(Exception):
    pass


def _count_evals(monkeypatch, crash_at: int | None = None) -> list:
    """Counts the evaluations; with ``crash_at``, raises at that one (before the epoch's checkpoint)."""
    calls, real = [], SupervisedTask.evaluate

    def spy(self, *args, **kwargs):
        calls.append(1)
        if crash_at is not None and len(calls) == crash_at:
            raise _Crash
        return real(self, *args, **kwargs)
    monkeypatch.setattr(SupervisedTask, "evaluate", spy)
    return calls


def _lines(run):
    """metrics.jsonl without its timings (training lines' img_per_s)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("img_per_s", None)
        out.append(rec)
    return out


def _eval_epochs(run):
    return [r["epoch"] for r in _lines(run) if "top1" in r]


def _safetensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _result(run):
    saved = json.loads((run / "result.json").read_text())
    saved.pop("seconds")
    return saved


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_a_resumed_run_ends_exactly_as_an_unbroken_one(digits8, tmp_path, monkeypatch, ema):
    train, test = digits8
    cfg = _cfg({"train.model_ema": ema})
    evals_per_epoch = 2 if ema else 1
    whole = finetune(_resnet(), train, test, cfg, run_dir=tmp_path / "whole", progress=False)

    # the crash: in epoch 3's evaluation, after its training steps, before its checkpoint
    with monkeypatch.context() as m:
        _count_evals(m, crash_at=2 * evals_per_epoch + 1)
        with pytest.raises(_Crash):
            finetune(_resnet(), train, test, cfg, run_dir=tmp_path / "cut", progress=False)
    cut = tmp_path / "cut"
    assert _eval_epochs(cut) == [1, 2] and not (cut / "result.json").exists()
    assert torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["step"] == 2 * 23   # epoch 2's end

    # resumed from another random init: every weight must come from the checkpoint
    calls = _count_evals(monkeypatch)
    again = finetune(_resnet(seed=5), train, test, cfg, run_dir=cut, progress=False, resume=True)
    assert len(calls) == evals_per_epoch                     # only epoch 3 was trained and evaluated

    a, b = whole["classifier"].state_dict(), again["classifier"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _lines(cut) == _lines(tmp_path / "whole") and _eval_epochs(cut) == [1, 2, 3]
    assert _result(cut) == _result(tmp_path / "whole")
    assert again["final"]["top1"] == whole["final"]["top1"] and again["best"] == whole["best"]
    files = ["classifier.safetensors", "classifier_best.safetensors"] + (["classifier_ema.safetensors"] if ema else [])
    for name in files:     # tensors and metadata (the header's key order is not fixed, so not the bytes)
        x, y = _safetensors(cut / name), _safetensors(tmp_path / "whole" / name)
        assert x[1] == y[1] and x[0].keys() == y[0].keys() and all(torch.equal(x[0][k], y[0][k]) for k in x[0]), name
    if ema:
        assert again["best_ema"] == whole["best_ema"]
        ea, eb = whole["ema_classifier"].state_dict(), again["ema_classifier"].state_dict()
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
        assert not torch.equal(ea["head.weight"], a["head.weight"])       # the EMA is a model of its own


def test_a_finished_run_is_not_trained_again_and_the_cli_resumes(digits8, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cli = ["finetune", "--out", str(run)] + [f"{k}={v}" for k, v in {
        "model.backbone": "random:resnet10_cifar", "data.source": "digits", "data.img_size": 8, "train.epochs": 2,
        "train.batch_size": 64, "train.device": "cpu", "data.num_workers": 0}.items()]
    with monkeypatch.context() as m:
        _count_evals(m, crash_at=2)                           # dies in epoch 2
        with pytest.raises(_Crash):
            main(cli)
    assert _eval_epochs(run) == [1]

    assert main(["finetune", "--resume", str(run)]) == 0
    assert "done: full fine-tuning, 46 steps" in capsys.readouterr().out
    assert _eval_epochs(run) == [1, 2]
    result = json.loads((run / "result.json").read_text())
    lines = _lines(run)

    # a finished run: nothing trained or evaluated again, its result returned
    calls = _count_evals(monkeypatch)
    assert main(["finetune", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 46 (2.00 epochs)" in out and "done: full fine-tuning, 46 steps" in out and not calls
    res = ft.run_finetune(None, run, progress=False, resume=True)
    assert not calls and {k: res[k] for k in result if k != "seconds"} == {k: v for k, v in result.items()
                                                                          if k != "seconds"}
    assert _lines(run) == lines
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    model = {k[len("model."):]: v for k, v in ckpt["method"].items() if k.startswith("model.")}
    own = res["classifier"].state_dict()
    assert own.keys() == model.keys() and all(torch.equal(v, model[k]) for k, v in own.items())

    # extra arguments with --resume are refused, in one line
    for extra in (["epochs=5"], ["--out", str(tmp_path / "x")]):
        assert main(["finetune", "--resume", str(run), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "--resume continues a run with its own config.yaml" in err and "\n" not in err
    # and so is another config through the API
    with pytest.raises(ConfigError, match="its own config.yaml"):
        ft.run_finetune(override(FinetuneConfig(), {"model.backbone": "random:resnet10_cifar", "train.epochs": 5}),
                        run, resume=True)


def test_resuming_through_finetune_with_another_config_is_refused(digits8, tmp_path):
    train, test = digits8
    small = train.subset(torch.arange(128))
    run = tmp_path / "run"
    finetune(_resnet(), small, test, _cfg({"train.epochs": 1, "model.drop_path_rate": 0.0}), run_dir=run,
             progress=False)
    with pytest.raises((ConfigError, TrainingError), match="epochs"):
        finetune(_resnet(), small, test, _cfg({"train.epochs": 2, "model.drop_path_rate": 0.0}), run_dir=run,
                 progress=False, resume=True)


def test_run_finetune_resumes_with_the_config_it_was_started_with(tmp_path):
    # run_finetune's docstring: resume with cfg None "or the same config"
    cfg = _cfg({"train.epochs": 1, "train.batch_size": 512, "model.drop_path_rate": 0.0})
    first = ft.run_finetune(cfg, tmp_path / "run", progress=False)
    again = ft.run_finetune(cfg, tmp_path / "run", progress=False, resume=True)
    assert again["final"] == first["final"]


def test_a_missing_or_damaged_checkpoint_is_a_one_line_error_naming_it(digits8, tmp_path, capsys):
    train, test = digits8
    run = tmp_path / "run"
    finetune(_resnet(), train, test, _cfg({"train.epochs": 1, "model.drop_path_rate": 0.0}), run_dir=run,
             progress=False)
    ckpt = run / "checkpoints" / "last.pt"

    ckpt.write_bytes(ckpt.read_bytes()[:1000])                # cut short, as by a full disk
    assert main(["finetune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(ckpt) in err and "is not a readable checkpoint" in err and "\n" not in err

    ckpt.unlink()
    assert main(["finetune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(ckpt) in err and "no checkpoint" in err and "\n" not in err
    assert main(["finetune", "--resume", str(tmp_path)]) == 2       # not a run directory
    assert "no config.yaml" in capsys.readouterr().err
