"""keel.evaluate.suite / report: the suite's numbers are the protocols' own (recomputed here by
calling them directly), the report shows them (best in bold), and the CLI runs it."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from PIL import Image

from keel import hub
from keel.cli import main
from keel.data.sources import build_dataset
from keel.engine.checkpoint import export_backbone
from keel.evaluate.features import cached_features
from keel.evaluate.fewshot import fewshot, sample_shots
from keel.evaluate.frozen import evaluate_frozen, make_eval_transform
from keel.evaluate.linear import linear_probe
from keel.evaluate.report import markdown, write_report
from keel.evaluate.robustness import robustness
from keel.evaluate.suite import (checkpoint_label, default_img_size, run_suite, sample_fraction,
                                 suite_finetune_config)
from keel.jobs.finetune import finetune
from keel.models.registry import create_model

TINY_VIT = {"img_size": 8, "depth": 2, "dim": 48, "num_heads": 3}


def _tiny_vit_run(folder, seed: int):
    """A run directory as pretraining leaves it: backbone.safetensors + card.json (tiny ViT, 8 px)."""
    torch.manual_seed(seed)
    export_backbone(create_model("vit_tiny_patch4_32", **TINY_VIT), folder,
                    {"model": "vit_tiny_patch4_32", "model_kwargs": TINY_VIT, "data": {"img_size": 8}})
    return folder


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    return _tiny_vit_run(tmp_path_factory.mktemp("vit-run"), seed=1)


@pytest.fixture(scope="module")
def suite(vit_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    report = run_suite(["random:resnet10_cifar", str(vit_run)], ["digits"], out, shots=(1, 3), draws=2,
                       finetune_epochs=1, img_size=8, device="cpu", progress=False, linear_epochs=3)
    return out, report


def test_suite_numbers_are_the_protocols_own(suite, vit_run):
    out, report = suite
    # recomputed for the run directory's (fast) tiny ViT, loaded as the suite loads it
    res = json.loads((out / "report.json").read_text())["results"]["digits"][vit_run.name]
    train = build_dataset("digits", "train", 8, labeled=True)
    test = build_dataset("digits", "test", 8, labeled=True)
    backbone = hub.resolve_backbone(str(vit_run), 8, seed=0)[0]

    frozen = evaluate_frozen(backbone, train, test, 8, ks=(20, 200), linear_epochs=3)
    assert res["knn"]["knn_top1@20"] == pytest.approx(frozen["knn_top1@20"], abs=1e-9)
    assert res["knn"]["knn_top1@200"] == pytest.approx(frozen["knn_top1@200"], abs=1e-9)
    assert res["linear"]["linear_top1"] == pytest.approx(frozen["linear_top1"], abs=1e-9)

    fs = fewshot(backbone, train, test, shots=(1, 3), draws=2, protocols=("knn", "linear"), knn_k=20, linear_epochs=3)
    for proto in ("knn", "linear"):
        for s in (1, 3):
            assert res["fewshot"][proto][str(s)]["values"] == pytest.approx(fs[proto][s]["values"], abs=1e-9)

    tuned = finetune(copy.deepcopy(backbone), train, test, suite_finetune_config(8, epochs=1, device="cpu"),
                     progress=False)
    assert res["finetune"]["final"]["top1"] == pytest.approx(tuned["final"]["top1"], abs=1e-9)
    assert res["finetune"]["steps"] == tuned["steps"] == 45          # ceil(1437 / 32) steps of one epoch
    rob = robustness(tuned["classifier"], test, 8, severities=(3,))
    assert res["robustness"]["scorer"] == "finetune" and res["robustness"]["severity"] == 3
    for kind in ("noise", "blur", "contrast", "jpeg"):
        assert res["robustness"][kind]["3"] == pytest.approx(rob[kind][3], abs=1e-9)
    assert res["robustness"]["clean"] == pytest.approx(res["finetune"]["final"]["top1"], abs=1e-9)
    assert set(res["seconds"]) >= {"load", "frozen", "fewshot", "finetune", "robustness", "total"}


def test_report_files_tables_and_bold(suite, vit_run):
    out, report = suite
    for name in ("report.md", "report.json", "fewshot_digits.png", "compare_digits.png", "robustness_digits.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    data = json.loads((out / "report.json").read_text())
    labels = [c["label"] for c in data["config"]["checkpoints"]]
    assert labels == ["random:resnet10_cifar", vit_run.name]
    assert data["config"]["checkpoints"][1]["img_size"] == 8 and data["datasets"]["digits"]["train_images"] == 1437
    res = data["results"]["digits"]

    md = (out / "report.md").read_text()
    assert f"| metric (top-1 %) | random:resnet10_cifar | {vit_run.name} |" in md
    # the kNN row: both values, the larger one (and only it) in bold
    row = next(line for line in md.splitlines() if line.startswith("| kNN top-1, k=20 |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    values = [res[lb]["knn"]["knn_top1@20"] for lb in labels]
    assert values[0] != values[1]                                     # two different backbones
    for cell, v in zip(cells, values):
        assert cell.strip("*") == f"{v:.2f}" and cell.startswith("**") == (v == max(values))
    fs = res[labels[1]]["fewshot"]["knn"]["3"]
    assert f"{fs['mean']:.2f} ± {fs['std']:.2f}" in md
    assert "| jpeg, severity 3 |" in md and "![few-shot](fewshot_digits.png)" in md
    # the report is drawn again from report.json alone, identically
    assert markdown(data, data["files"]["figures"]) == md
    again = out / "again"
    write_report(data, again)
    assert (again / "report.md").read_text() == md


def test_labels_and_default_sizes(vit_run):
    assert checkpoint_label("random:resnet18_cifar") == "random:resnet18_cifar"
    assert checkpoint_label("timm:vit_small_patch16_224:/w/vit.safetensors") == "timm:vit_small_patch16_224"
    assert checkpoint_label(str(vit_run / "backbone.safetensors")) == vit_run.name == checkpoint_label(f"{vit_run}/")
    assert default_img_size(str(vit_run)) == 8 and default_img_size("random:resnet10_cifar") == 32


def test_cli_suite_on_a_labeled_folder_with_knn_robustness(tmp_path, vit_run, capsys):
    digits = build_dataset("digits", "train", 8, labeled=True)
    for c in (0, 1):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i, k in enumerate((digits.labels == c).nonzero().flatten()[:12].tolist()):
            Image.fromarray(digits.images[k].permute(1, 2, 0).numpy()).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    out = tmp_path / "suite"
    argv = ["eval", "suite", "--checkpoint", str(vit_run), "random:resnet10_cifar", "--data", str(tmp_path / "data"),
            "--img-size", "8", "--protocols", "knn", "fewshot", "robustness", "--shots", "1", "50", "--draws", "2",
            "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "## data" in printed and f"wrote {out / 'report.md'}" in printed
    data = json.loads((out / "report.json").read_text())
    res = data["results"]["data"][vit_run.name]
    assert set(res) >= {"knn", "fewshot", "robustness"} and "linear" not in res and "finetune" not in res
    # without fine-tuning, robustness is kNN (k=20) against clean features: its clean number is the kNN one
    assert res["robustness"]["scorer"] == "knn@20"
    assert res["robustness"]["clean"] == pytest.approx(res["knn"]["knn_top1@20"], abs=1e-9)
    assert list(res["fewshot"]["knn"]) == ["1"] and any("[50]-shot left out" in n for n in data["notes"])
    assert data["datasets"]["data"]["train_images"] == 19 and data["datasets"]["data"]["test_images"] == 5  # every 5th held out


def test_cli_one_checkpoint_for_other_protocols(capsys):
    assert main(["eval", "knn", "model.backbone=[random:resnet10_cifar,random:resnet18_cifar]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "several only for suite" in err[0]
    # keel 0.1's flag: the same one-line error after the flag's deprecation line
    assert main(["eval", "knn", "--checkpoint", "random:resnet10_cifar", "random:resnet18_cifar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--checkpoint -> model.backbone" in err[0] and "several only for suite" in err[1]
    with pytest.raises(ValueError, match="unknown protocol"):
        run_suite(["random:resnet10_cifar"], ["digits"], "unused", protocols=("knn", "magic"))
    from keel.cli_eval import EVAL_EPILOG
    assert re.search(r"suite\s+several backbones", EVAL_EPILOG)


def test_hyperrule_recipe_and_early_errors(tmp_path):
    report = run_suite(["random:resnet10_cifar"], ["digits"], tmp_path / "s", protocols=("finetune",), img_size=8,
                       finetune_recipe="hyperrule", hyperrule_scale=0.002, device="cpu", progress=False)
    ft = report["results"]["digits"]["random:resnet10_cifar"]["finetune"]
    cfg = ft["config"]
    t = cfg["train"]
    # 500 x 0.002 = 1 BiT step of 512 images on 1437 images -> 1 epoch of ceil(1437 / 512) = 3 steps
    assert (t["optimizer"], t["schedule"], t["epochs"], t["batch_size"], cfg["data"]["img_size"]) == \
        ("sgd", "step", 1, 512, 8)
    assert t["milestones"] == pytest.approx([0.4, 0.6, 0.8]) and t["lr"] == pytest.approx(0.0015)
    assert ft["steps"] == 3 and "BiT-HyperRule" in ft["explanation"] and ft["recipe"] == "hyperrule"
    with pytest.raises(ValueError, match="resnet99"):
        run_suite(["random:resnet10_cifar", "random:resnet99"], ["digits"], tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------- label fractions
DIGITS_TRAIN_COUNTS = [136, 154, 151, 135, 143, 143, 151, 153, 138, 133]   # digits' 1437 training images


def test_sample_fraction_is_class_balanced_seeded_and_nested():
    y = build_dataset("digits", "train", 8, labeled=True).labels
    assert torch.bincount(y).tolist() == DIGITS_TRAIN_COUNTS
    # round(f * n_c) per class, by hand; Python's round takes halves to even (75.5 -> 76, 66.5 -> 66)
    expected = {0.001: [1] * 10,                                    # 0.14 .. 0.15 -> 0, at least one
                0.01: [1, 2, 2, 1, 1, 1, 2, 2, 1, 1],
                0.1: [14, 15, 15, 14, 14, 14, 15, 15, 14, 13],
                0.5: [68, 77, 76, 68, 72, 72, 76, 76, 69, 66]}
    for f, counts in expected.items():
        idx = sample_fraction(y, f, seed=3)
        assert torch.bincount(y[idx], minlength=10).tolist() == counts, f
        assert len(set(idx.tolist())) == len(idx) and idx.tolist() == sorted(idx.tolist())
    assert torch.equal(sample_fraction(y, 1.0), torch.arange(len(y)))   # all of it, in dataset order
    # reproducible by seed, another seed another subset, a smaller fraction inside a larger one
    assert torch.equal(sample_fraction(y, 0.1, seed=3), sample_fraction(y, 0.1, seed=3))
    assert not torch.equal(sample_fraction(y, 0.1, seed=3), sample_fraction(y, 0.1, seed=4))
    assert set(sample_fraction(y, 0.1, seed=3).tolist()) <= set(sample_fraction(y, 0.5, seed=3).tolist())
    # classes of equal size: exactly few-shot's first draw (so benchmarks/transfer.py's labels subsets)
    balanced = torch.arange(60) % 6
    assert torch.equal(sample_fraction(balanced, 0.3, seed=5), sample_shots(balanced, 3, draws=1, seed=5)[0])
    # unlabeled images (-1) are never taken
    partly = torch.tensor([-1, 0, 0, 1, -1, 1, 1, 0])
    assert torch.equal(sample_fraction(partly, 1.0), torch.tensor([1, 2, 3, 5, 6, 7]))
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            sample_fraction(y, bad)


@pytest.fixture(scope="module")
def vit_run2(tmp_path_factory):
    return _tiny_vit_run(tmp_path_factory.mktemp("vit-other"), seed=2)


def test_suite_label_fractions(suite, vit_run, vit_run2, tmp_path):
    _, plain = suite
    out = tmp_path / "fractions"
    report = run_suite([str(vit_run), str(vit_run2)], ["digits"], out, protocols=("linear", "finetune"),
                       finetune_epochs=1, img_size=8, device="cpu", progress=False, linear_epochs=3,
                       label_fractions=(1, 0.1))
    data = json.loads((out / "report.json").read_text())
    assert data["config"]["label_fractions"] == [0.1, 1.0]
    # without fractions the suite writes what it always wrote
    assert "label_fractions" not in plain["config"]
    assert all("label_fractions" not in r for r in plain["results"]["digits"].values())

    train = build_dataset("digits", "train", 8, labeled=True)
    test = build_dataset("digits", "test", 8, labeled=True)
    idx = sample_fraction(train.labels, 0.1, seed=0)
    for run in (vit_run, vit_run2):
        res = data["results"]["digits"][run.name]
        fr = res["label_fractions"]
        assert list(fr) == ["0.1", "1.0"] and fr["0.1"]["n_train"] == 143 and fr["1.0"]["n_train"] == 1437
        # the rest of the suite is untouched by the fractions: the same numbers as the run without them
        if run == vit_run:
            before = plain["results"]["digits"][vit_run.name]
            assert res["linear"] == before["linear"] and res["finetune"]["final"] == before["finetune"]["final"]
        # 100% is the suite's own linear probe (recomputed on the subset's rows: all of them) and fine-tune
        assert fr["1.0"]["linear"] == pytest.approx(res["linear"]["linear_top1"], abs=1e-9)
        assert fr["1.0"]["finetune"] == res["finetune"]["final"]["top1"] and fr["1.0"]["finetune_steps"] == 45
        # 10%: the linear probe and the fine-tuning called directly on the same 143 images
        backbone = hub.resolve_backbone(str(run), 8, seed=0)[0]
        xtr, ytr = cached_features(backbone, train, make_eval_transform(8), None)
        xte, yte = cached_features(backbone, test, make_eval_transform(8), None)
        direct = linear_probe(xtr[idx], ytr[idx], xte, yte, num_classes=10, epochs=3)
        assert fr["0.1"]["linear"] == pytest.approx(direct["linear_top1"], abs=1e-9)
        tuned = finetune(copy.deepcopy(backbone), train.subset(idx), test,
                         suite_finetune_config(8, epochs=1, device="cpu"), progress=False)
        assert fr["0.1"]["finetune"] == pytest.approx(tuned["final"]["top1"], abs=1e-9)
        assert fr["0.1"]["finetune_steps"] == tuned["steps"] == 5             # ceil(143 / 32)

    md = (out / "report.md").read_text()
    a, b = vit_run.name, vit_run2.name
    assert f"| labels (top-1 %) | {a} · linear | {b} · linear | {a} · fine-tune | {b} · fine-tune |" in md
    row = next(line for line in md.splitlines() if line.startswith("| 10% (143 images) |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    values = [data["results"]["digits"][r.name]["label_fractions"]["0.1"][p]
              for p in ("linear", "finetune") for r in (vit_run, vit_run2)]
    assert [c.strip("*") for c in cells] == [f"{v:.2f}" for v in values]
    for i, cell in enumerate(cells):          # bold: the better checkpoint of each protocol
        rival = values[i ^ 1]
        assert cell.startswith("**") == (values[i] >= rival)
    assert "| 100% (1,437 images) |" in md and "![label fractions](fractions_digits.png)" in md
    with Image.open(out / "fractions_digits.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert markdown(data, data["files"]["figures"]) == md
    assert report["results"]["digits"][a]["label_fractions"]["0.1"]["n_train"] == 143
