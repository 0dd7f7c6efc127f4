"""keel.evaluate.suite / report: the suite's numbers are the protocols' own (recomputed here by
calling them directly), the report shows them (best in bold), and the CLI runs it."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from PIL import Image

from keel.cli import main
from keel.data.sources import build_dataset
from keel.engine.checkpoint import export_backbone
from keel.evaluate.fewshot import fewshot
from keel.evaluate.finetune import finetune, load_for_finetune
from keel.evaluate.frozen import evaluate_frozen
from keel.evaluate.report import markdown, write_report
from keel.evaluate.robustness import robustness
from keel.evaluate.suite import checkpoint_label, default_img_size, run_suite, suite_finetune_config
from keel.models.registry import create_model

TINY_VIT = {"img_size": 8, "depth": 2, "dim": 48, "num_heads": 3}


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A run directory as pretraining leaves it: backbone.safetensors + card.json (tiny ViT, 8 px)."""
    run = tmp_path_factory.mktemp("vit-run")
    torch.manual_seed(1)
    export_backbone(create_model("vit_tiny_patch4_32", **TINY_VIT), run,
                    {"model": "vit_tiny_patch4_32", "model_kwargs": TINY_VIT, "data": {"img_size": 8}})
    return run


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
    backbone = load_for_finetune(str(vit_run), 8, seed=0)

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
    assert res["finetune"]["steps"] == tuned["steps"] == 12          # ceil(1437 / 128) steps of one epoch
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
    assert main(["eval", "knn", "--checkpoint", "random:resnet10_cifar", "random:resnet18_cifar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "several only for suite" in err[0]
    with pytest.raises(ValueError, match="unknown protocol"):
        run_suite(["random:resnet10_cifar"], ["digits"], "unused", protocols=("knn", "magic"))
    assert re.search(r"suite\s+several checkpoints", main.__globals__["EVAL_EPILOG"])


def test_hyperrule_recipe_and_early_errors(tmp_path):
    report = run_suite(["random:resnet10_cifar"], ["digits"], tmp_path / "s", protocols=("finetune",), img_size=8,
                       finetune_recipe="hyperrule", hyperrule_scale=0.002, device="cpu", progress=False)
    ft = report["results"]["digits"]["random:resnet10_cifar"]["finetune"]
    cfg = ft["config"]
    # 500 x 0.002 = 1 BiT step of 512 images on 1437 images -> 1 epoch of ceil(1437 / 512) = 3 steps
    assert (cfg["optimizer"], cfg["schedule"], cfg["epochs"], cfg["batch_size"], cfg["img_size"]) == \
        ("sgd", "step", 1, 512, 8)
    assert cfg["milestones"] == pytest.approx([0.4, 0.6, 0.8]) and cfg["lr"] == pytest.approx(0.0015)
    assert ft["steps"] == 3 and "BiT-HyperRule" in ft["explanation"] and ft["recipe"] == "hyperrule"
    with pytest.raises(ValueError, match="resnet99"):
        run_suite(["random:resnet10_cifar", "random:resnet99"], ["digits"], tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()
