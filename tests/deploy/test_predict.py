"""keel.deploy.predict: tiny fine-tune runs trained here (single-label on a folder of class
sub-folders, multi-label on an image,labels CSV), their CSVs checked against the eager model on
the same pixels normalised by hand; a file that does not decode is listed, not a crash; runs that
are not classifiers are refused in one line."""
from __future__ import annotations

import argparse
import csv
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from keel.config import FinetuneConfig, override
from keel.data.sources import build_dataset
from keel.deploy.predict import load_classifier_run, predict
from keel.jobs.finetune import run_finetune

NAMES = ["zero", "one", "two"]


def _save(image: torch.Tensor, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def _normalised(images: torch.Tensor) -> torch.Tensor:
    """keel's evaluation input, by hand: RGB in [0, 1], then (x - 0.5) / 0.5."""
    return (images.float() / 255 - 0.5) / 0.5


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _train(source, run_dir, **extra) -> None:
    cfg = override(FinetuneConfig(), {
        "model.backbone": "random:resnet10_cifar", "data.source": str(source), "data.img_size": 8,
        "data.num_workers": 0, "train.epochs": 1, "train.batch_size": 32, "train.warmup_epochs": 0.0,
        "train.device": "cpu", **extra})
    run_finetune(cfg, run_dir, progress=False)


@pytest.fixture(scope="module")
def digits8():
    return build_dataset("digits", "train", 8, labeled=True), build_dataset("digits", "test", 8, labeled=True)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, digits8):
    """Fine-tuned on a folder of 8x8 digits 0, 1, 2 in class sub-folders named zero, one, two."""
    root = tmp_path_factory.mktemp("single")
    train, _ = digits8
    for i in torch.nonzero(train.labels < 3).flatten()[:150].tolist():
        _save(train.images[i], root / "data" / NAMES[int(train.labels[i])] / f"{i:04d}.png")
    _train(root / "data", root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    """Fine-tuned on an image,labels CSV: coloured 8x8 squares labelled by their strong channels."""
    root = tmp_path_factory.mktemp("multi")
    gen = torch.Generator().manual_seed(0)
    lines = ["image,labels"]
    for i in range(48):
        on = torch.rand(3, generator=gen) > 0.5
        if not on.any():
            on[i % 3] = True
        image = (torch.rand(3, 8, 8, generator=gen) * 60 + on.view(3, 1, 1) * 180).to(torch.uint8)
        _save(image, root / "images" / f"{i:03d}.png")
        lines.append(f"images/{i:03d}.png," + ";".join(c for c, o in zip(("red", "green", "blue"), on) if o))
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    _train(root / "labels.csv", root / "run", **{"task.threshold": 0.5})
    return root / "run"


def test_folder_top_k_equals_the_eager_model_and_a_bad_file_is_listed(single_run, digits8, tmp_path):
    _, test = digits8
    images = test.images[:12]
    for i, image in enumerate(images):
        _save(image, tmp_path / "new" / ("a" if i % 2 else "b") / f"{i:02d}.png")
    (tmp_path / "new" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    res = predict(str(single_run), str(tmp_path / "new"), tmp_path / "out.csv", num_workers=0, progress=False)
    assert (res["images"], res["predicted"], res["skipped"], res["kind"]) == (13, 12, 1, "single")

    rows = _rows(tmp_path / "out.csv")
    assert list(rows[0]) == ["path", "top1", "p1", "top2", "p2", "top3", "p3", "error"]   # k=5 > 3 classes
    assert [r["path"] for r in rows] == sorted(str(p) for p in (tmp_path / "new").rglob("*.png"))
    model, run = load_classifier_run(str(single_run))
    assert run.classes == sorted(NAMES)                        # ImageFolder's order: one, two, zero
    with torch.no_grad():
        probs = torch.softmax(model(_normalised(images)), dim=1)
    by_file = {str(tmp_path / "new" / ("a" if i % 2 else "b") / f"{i:02d}.png"): p for i, p in enumerate(probs)}
    for row in rows:
        if row["path"].endswith("broken.png"):
            assert row["error"] and row["top1"] == "" and row["p1"] == ""
            continue
        want = by_file[row["path"]]
        assert row["error"] == "" and row["top1"] == run.classes[int(want.argmax())]
        p = [float(row[f"p{j}"]) for j in (1, 2, 3)]
        assert abs(p[0] - float(want.max())) < 1e-5 and p == sorted(p, reverse=True)
        assert sum(p) <= 1 + 3e-6
        assert {row[f"top{j}"] for j in (1, 2, 3)} == set(NAMES)


def test_builtin_rows_follow_the_dataset(single_run, digits8, tmp_path):
    _, test = digits8
    predict(str(single_run), "digits", tmp_path / "d.csv", k=2, num_workers=0, progress=False)
    rows = _rows(tmp_path / "d.csv")
    assert [r["path"] for r in rows[:3]] == ["digits:test:0", "digits:test:1", "digits:test:2"]
    model, run = load_classifier_run(str(single_run))
    with torch.no_grad():
        top = model(_normalised(test.images)).argmax(1)
    assert len(rows) == len(test) and [r["top1"] for r in rows] == [run.classes[int(t)] for t in top]
    assert all(float(r["p1"]) + float(r["p2"]) <= 1 + 2e-6 for r in rows)


def test_multilabel_gives_every_class_above_threshold(multilabel_run, tmp_path):
    images_dir = multilabel_run.parent / "images"
    res = predict(str(multilabel_run), str(images_dir), tmp_path / "m.csv", num_workers=0, progress=False)
    assert res["kind"] == "multilabel"
    rows = _rows(tmp_path / "m.csv")
    assert list(rows[0]) == ["path", "labels", "probabilities", "error"]
    model, run = load_classifier_run(str(multilabel_run))
    assert run.classes == ["blue", "green", "red"] and run.threshold == 0.5
    paths = sorted(images_dir.glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths])
    with torch.no_grad():
        probs = torch.sigmoid(model(_normalised(pixels)))
    hits = 0
    for row, path, p in zip(rows, paths, probs):
        assert row["path"] == str(path)
        want = {run.classes[c] for c in range(3) if p[c] >= 0.5}
        labels = row["labels"].split(";") if row["labels"] else []
        got = [float(q) for q in row["probabilities"].split(";")] if row["probabilities"] else []
        assert set(labels) == want and len(got) == len(labels)
        assert got == sorted(got, reverse=True) and all(q >= 0.5 for q in got)
        assert all(abs(q - float(p[run.classes.index(c)])) < 1e-5 for c, q in zip(labels, got))
        hits += len(labels)
    assert 0 < hits < 3 * len(rows)          # the threshold really splits the classes


def test_gone_source_numbers_the_classes(single_run, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(single_run, moved, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["data"]["source"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = predict(str(moved), "digits", tmp_path / "n.csv", k=1, num_workers=0, progress=False)
    assert "classes are numbered 0..2" in res["note"]
    assert {r["top1"] for r in _rows(tmp_path / "n.csv")} <= {"0", "1", "2"}


def test_runs_that_are_not_classifiers_are_refused(tmp_path):
    det = tmp_path / "detect-run"
    det.mkdir()
    (det / "detector.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="keel detect run: predict its boxes with `keel detect predict") as err:
        predict(str(det), "digits", tmp_path / "x.csv")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="is not a fine-tune run"):
        predict("random:resnet10_cifar", "digits", tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


def test_cli(single_run, tmp_path, capsys):
    from keel.cli_deploy import add_parsers, cmd_predict
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"), argparse.RawDescriptionHelpFormatter)
    args = parser.parse_args(["predict", "--checkpoint", str(single_run), "--data", "digits", "-k", "2",
                              "--num-workers", "0", "--device", "cpu"])
    assert cmd_predict(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("360 of 360 images predicted (top-2 classes, ")
    assert (single_run / "predictions-digits.csv").is_file()
