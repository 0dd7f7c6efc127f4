"""The ``keel`` command, called in-process (plus one real ``python -m keel``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from keel.cli import main


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["pretrain"], ["eval"], ["demo"], ["models"]], ids=lambda a: a[0] if a else "keel")
def test_help_has_examples(argv, capsys):
    text = _help(argv + ["--help"], capsys)
    assert text.startswith("usage: keel")
    assert "example" in text
    # at least one runnable example line for this very command
    prefix = "  keel " + (argv[0] if argv else "")
    assert any(line.startswith(prefix) for line in text.splitlines()), text


def test_pretrain_help_lists_config_keys(capsys):
    text = _help(["pretrain", "--help"], capsys)
    for key in ("train:", "epochs=10", "data:", "source='digits'", "eval:", "knn_k=[20, 200]"):
        assert key in text


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: keel" in capsys.readouterr().out


def test_version(capsys):
    import keel
    assert _help(["--version"], capsys).strip() == f"keel {keel.__version__}"


def test_models_lists_sizes(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.split()[0] == "resnet18_cifar")
    assert row.split()[1] == "11.17"
    assert any(line.split()[0] == "vit_tiny_patch4_32" for line in lines[1:])


def test_models_filter(capsys):
    assert main(["models", "resnet"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names and all("resnet" in n for n in names)


def test_missing_data_fails_before_any_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "data.source=/nonexistent"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "/nonexistent" in err[0] and err[0].startswith("keel pretrain: error:")
    assert os.listdir(tmp_path) == []        # no runs/ folder, no run directory


@pytest.mark.parametrize("argv, needle", [
    (["pretrain", "train.epoch=3"], "train.epoch"),
    (["pretrain", "train.epochs=abc"], "train.epochs"),
    (["pretrain", "trainepochs"], "trainepochs"),
    (["pretrain", "-c", "missing.yaml"], "missing.yaml"),
    (["pretrain", "model.name=resnet99"], "resnet99"),
    (["pretrain", "--resume", "not-a-run"], "not-a-run"),
    (["eval", "knn", "model.backbone=no/such/run"], "no/such/run"),
    (["eval", "knn", "model.backbone=random:resnet99"], "resnet99"),
    (["eval", "knn", "data.source=digits"], "model.backbone is not set"),
    (["finetune", "model.backbone=no/such/run"], "model.backbone: no such file"),
])
def test_user_errors_exit_2_with_one_line(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEEL_DEBUG", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert os.listdir(tmp_path) == []


def test_pretrain_resume_then_eval_knn(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *tiny_overrides, "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "done: 4 steps" in out and str(run / "backbone.safetensors") in out

    # continue the same run for one more epoch
    assert main(["pretrain", "--resume", str(run), "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 4" in out and "done: 8 steps" in out

    res_file = tmp_path / "res.json"
    assert main(["eval", "knn", f"model.backbone={run}", "data.source=digits", f"eval.json={res_file}"]) == 0
    out = capsys.readouterr().out
    assert "knn_top1@20" in out and "knn_top1@200" in out and "linear" not in out
    res = json.loads(res_file.read_text())
    assert 0 <= res["knn_top1@20"] <= 100


def test_eval_linear_random_baseline(capsys):
    argv = ["eval", "linear", "model.backbone=random:resnet10_cifar", "data.source=digits", "data.img_size=8",
            "eval.linear_epochs=5", "run.device=cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "linear_top1" in out and "knn" not in out
    acc = float(next(line for line in out.splitlines() if "linear_top1" in line).split()[-1])
    assert 0 <= acc <= 100
    # the same command gives the same number (the random backbone and the probe are seeded)
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert float(next(line for line in again.splitlines() if "linear_top1" in line).split()[-1]) == acc


def test_eval_still_takes_the_old_flags_with_one_line_of_warning(capsys):
    argv = ["eval", "knn", "--checkpoint", "random:resnet10_cifar", "--data", "digits", "--img-size", "8",
            "--k", "5", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "knn_top1@5" in captured.out
    warn = [line for line in captured.err.splitlines() if "deprecated" in line]
    assert len(warn) == 1 and "--checkpoint -> model.backbone" in warn[0] and "--k -> eval.knn_k" in warn[0]


def test_python_dash_m_keel():
    proc = subprocess.run([sys.executable, "-m", "keel", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: keel")


def test_overrides_may_follow_options(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", *tiny_overrides[:3], "--out", str(run), *tiny_overrides[3:], "train.epochs=1"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pretrain", "--out", str(tmp_path / "r2"), "--bogus", *tiny_overrides])


def test_models_prints_gmacs_and_head_option(capsys):
    assert main(["models", "resnet18", "--with-head"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["name", "params", "(M)", "GMACs", "at"]
    row = next(line.split() for line in lines if line.split()[0] == "resnet18")
    assert row[1] == "11.69" and row[2] == "1.81" and row[3] == "224"


def test_finetune_and_fewshot_commands(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "model.backbone=random:resnet10_cifar", "data.img_size=8", "train.epochs=1",
                 "train.lr=3e-2", "train.device=cpu", "--out", str(out)]) == 0
    assert "top1" in capsys.readouterr().out
    assert (out / "classifier.safetensors").is_file() and (out / "config.yaml").is_file()
    assert main(["finetune", "data.img_size=8"]) == 2  # no backbone: one-line error
    assert "backbone is not set" in capsys.readouterr().err
    assert main(["eval", "fewshot", "model.backbone=random:resnet10_cifar", "data.img_size=8", "eval.shots=[1,5]",
                 "eval.draws=2", "run.device=cpu", f"eval.json={tmp_path / 'fs.json'}"]) == 0
    res = json.loads((tmp_path / "fs.json").read_text())
    assert set(res) == {"knn", "linear"} and len(res["knn"]["5"]["values"]) == 2


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_eval_suite_rejects_label_fractions_outside_0_1(value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEEL_DEBUG", raising=False)
    argv = ["eval", "suite", "model.backbone=random:resnet10_cifar", "data.source=digits",
            f"eval.label_fractions=[0.1,{value}]", f"eval.out={tmp_path / 'suite'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keel eval: error: label fractions must lie in (0, 1]"), err
    assert f"got {float(value):g} " in err[0] and "0.1" not in err[0].split("got")[1].split("(")[0]
    assert os.listdir(tmp_path) == []            # refused before any data is read or file written
    # and only the suite takes them
    assert main(["eval", "knn", "model.backbone=random:resnet10_cifar", "eval.label_fractions=[0.1]"]) == 2
    assert "eval.label_fractions is for `keel eval suite`" in capsys.readouterr().err


def test_a_closed_pipe_is_not_an_error():
    """`keel models | head -2`: the reader leaves early; keel stops quietly with status 0."""
    proc = subprocess.run(f"{sys.executable} -m keel models | head -2", shell=True, capture_output=True,
                          text=True, timeout=60, executable="/bin/bash")
    assert proc.stdout.splitlines()[0].startswith("name") and len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
