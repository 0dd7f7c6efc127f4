"""keel.jobs.finetune under torchrun: 2 gloo processes against 1 process.

The workers run this file as a script with torchrun's environment (``launch_workers`` in
conftest). One launch serves these checks (starting a process that imports torch costs seconds):

* a tiny ViT (LayerNorm only: no per-rank BatchNorm statistics on CPU) fine-tuned in full mode for
  8 steps ends with the weights, the EMA, the per-epoch losses (the training lines at each epoch's
  end) and the test metrics of the same
  run in one process. The batches are 51, 51, 51 and 50 images, so the ranks' shares differ by an
  image (26 and 25), which the loss weighting must undo;
* only rank 0 writes run_dir, and both ranks return the same result;
* the test set cut into shards (51 and 50 images, several batches each) and gathered gives every
  rank exactly the outputs and targets of one process, in order;
* ``run_finetune`` (data, backbone and all) creates the process group, and the ranks end with one
  model, BatchNorm statistics included (linear mode: the feature BatchNorm normalises with each
  rank's share on CPU, its running statistics are rank 0's);
* the new collectives: ``all_gather_cat`` with unequal sizes and bool, ``broadcast_buffers``.

A second launch runs the README's command, ``torchrun --nproc_per_node 2 -m keel finetune``.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import keel
import keel.jobs.finetune as ft
from keel.config import FinetuneConfig, override
from keel.data.sources import build_dataset
from keel.engine import distributed as D
from keel.jobs.finetune import finetune
from keel.models.classifier import Classifier
from keel.tasks.classify import ClassificationTask, SupervisedTask

WORLD = 2
N_TRAIN, N_TEST = 203, 101   # ceil(203 / 64) = 4 batches of 51, 51, 51, 50; 101 = 51 + 50 test shards


def _data():
    train = build_dataset("digits", "train", 8, labeled=True).subset(torch.arange(N_TRAIN))
    test = build_dataset("digits", "test", 8, labeled=True).subset(torch.arange(N_TEST))
    return train, test


def _vit(seed: int = 0):
    torch.manual_seed(seed)
    return keel.create_model("vit_tiny_patch4_32", img_size=8, depth=2, dim=48, num_heads=3)


def _cfg() -> FinetuneConfig:
    # plain crop + flip views (the exact path), EMA and clipping on: both must see one model
    return override(FinetuneConfig(), {
        "data.img_size": 8, "train.epochs": 2, "train.batch_size": 64, "train.lr": 2e-3, "train.warmup_epochs": 0.5,
        "model.drop_path_rate": 0.0, "train.model_ema": 0.5, "train.clip_grad": 1.0, "train.device": "cpu",
        "data.num_workers": 0})


def _rf_cfg() -> FinetuneConfig:
    # run_finetune end to end: linear mode on a ResNet (its BatchNorm frozen; the feature
    # BatchNorm's statistics are per rank on CPU, then rank 0's everywhere)
    return override(FinetuneConfig(), {
        "model.backbone": "random:resnet10_cifar", "data.source": "digits", "data.img_size": 8, "train.epochs": 1,
        "train.batch_size": 480, "task.mode": "linear", "train.device": "cpu", "data.num_workers": 0})


def _fixed_classifier():
    torch.manual_seed(1)
    return Classifier(_vit(1), torch.nn.Linear(48, 10))


def _predict(model, test):
    # the fine-tuning task's evaluation pass (its eval transform at 8 px), on another model
    task = SupervisedTask(_vit(2), ClassificationTask(10), _cfg())
    return task.predict(test, torch.device("cpu"), contextlib.nullcontext, model=model, batch_size=16,
                        num_workers=0)


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("classifier", "ema_classifier", "seconds")}


# ---------------------------------------------------------------- worker (run as a script)
def _worker(task: Path) -> None:
    out: dict = {}
    info = D.init_distributed("cpu")
    r = info.rank
    # the collectives added for fine-tuning
    x = torch.arange(3 - r, dtype=torch.float32).view(-1, 1) + 10 * r      # rank 0: 3 rows, rank 1: 2
    out["gathered"] = D.all_gather_cat(x)
    out["gathered_bool"] = D.all_gather_cat(torch.tensor([r == 0] * (2 + r)))
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(float(r + 1))
    bn.num_batches_tracked.fill_(5 + r)
    D.broadcast_buffers(bn)
    out["buffers"] = {k: v.clone() for k, v in bn.state_dict().items()}

    train, test = _data()
    res = finetune(_vit(), train, test, _cfg(), run_dir=task / f"run{r}", progress=False)
    out["result"] = json.dumps(_public(res), sort_keys=True)
    out["state"] = res["classifier"].state_dict()
    out["ema"] = res["ema_classifier"].state_dict()
    out["outputs"], out["targets"] = _predict(_fixed_classifier(), test)
    D.barrier()
    dist.destroy_process_group()

    # run_finetune with no process group: it creates one from the environment. (On a port of its
    # own: a second group on the first one's port could meet that group's store before the other
    # rank has closed it.) It leaves the group it created at the end.
    os.environ["MASTER_PORT"] = (task / "port2").read_text()
    out["group_before"] = dist.is_initialized()
    rf = ft.run_finetune(_rf_cfg(), run_dir=task / f"rf{r}", progress=False)
    out["group_after"] = dist.is_initialized()
    out["rf_result"] = json.dumps(_public(rf), sort_keys=True)
    out["rf_state"] = rf["classifier"].state_dict()
    if dist.is_initialized():
        dist.destroy_process_group()
    torch.save(out, task / f"rank{r}.pt")


# ---------------------------------------------------------------- the checks
@pytest.fixture(scope="module")
def runs(tmp_path_factory, launch_workers, free_port):
    """(one-process run, its run_dir, [rank 0 results, rank 1 results], the task folder)."""
    task = tmp_path_factory.mktemp("ft_ddp")
    (task / "port2").write_text(str(free_port()))
    results = launch_workers(__file__, task, WORLD)
    train, test = _data()
    one = finetune(_vit(), train, test, _cfg(), run_dir=task / "one", progress=False)
    return one, task / "one", results, task


def _metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s]
    return [{k: v for k, v in rec.items() if k != "img_per_s"} for rec in lines]


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one(runs):
    one, _, results, _ = runs
    assert one["steps"] == 8
    start = _vit().state_dict()
    assert not torch.allclose(one["classifier"].state_dict()["backbone.pos_embed"], start["pos_embed"], atol=1e-4)
    for res in results:
        for name, ref in (("state", one["classifier"].state_dict()), ("ema", one["ema_classifier"].state_dict())):
            assert set(res[name]) == set(ref)
            for k, v in ref.items():
                got, v = res[name][k].clone(), v.clone()
                if k.endswith("attn.qkv.bias"):
                    # the key bias has no true gradient (softmax ignores a shift shared by all keys):
                    # AdamW normalizes its float noise, whose sign depends on the order of the sums,
                    # into steps of up to the lr; compared to 8 steps x peak lr (2e-3 x 64/256), not bit-close
                    dim = v.numel() // 3
                    torch.testing.assert_close(got[dim:2 * dim], v[dim:2 * dim], atol=8 * 5e-4, rtol=0,
                                               msg=f"{name} {k} (keys)")
                    got[dim:2 * dim] = v[dim:2 * dim]
                torch.testing.assert_close(got, v, atol=1e-5, rtol=1e-4, msg=f"{name} {k}")
    # the ranks hold one model, to the last bit (DDP's averaged gradients, the same optimizer)
    for k in results[0]["state"]:
        assert torch.equal(results[0]["state"][k], results[1]["state"][k]), k
        assert torch.equal(results[0]["ema"][k], results[1]["ema"][k]), k


@pytest.mark.slow
def test_two_processes_log_the_losses_and_metrics_of_one(runs):
    _, one_dir, _, task = runs
    ref, got = _metrics(one_dir), _metrics(task / "run0")
    # per epoch: a training line (the epoch's mean loss), the evaluation and the EMA's evaluation
    assert [(r["step"], r["epoch"]) for r in got] == [(4, 1), (4, 1), (4, 1), (8, 2), (8, 2), (8, 2)]
    assert [sorted(set(r) - {"step", "epoch"}) for r in got[:3]] == [["loss", "lr"], ["top1", "top5"],
                                                                      ["ema_top1", "ema_top5"]]
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert set(a) == set(b) and (a["step"], a["epoch"]) == (b["step"], b["epoch"])
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)   # the whole batches' mean losses
            assert a["lr"] == b["lr"]
        for k in set(a) & {"top1", "top5", "ema_top1", "ema_top5"}:
            assert a[k] == b[k], k                                 # whole test set, counted exactly


@pytest.mark.slow
def test_only_rank_0_writes_and_both_ranks_return_the_same_result(runs):
    one, _, results, task = runs
    assert results[0]["result"] == results[1]["result"]
    assert json.loads(results[0]["result"]) == json.loads(json.dumps(_public(one)))
    for name in ("config.yaml", "metrics.jsonl", "classifier.safetensors", "classifier_best.safetensors",
                 "classifier_ema.safetensors", "result.json", "curves.png"):
        assert (task / "run0" / name).is_file(), name
    assert not (task / "run1").exists()
    saved = json.loads((task / "run0" / "result.json").read_text())
    assert {k: v for k, v in saved.items() if k != "seconds"} == json.loads(results[0]["result"])


@pytest.mark.slow
def test_gathered_evaluation_is_the_one_process_evaluation(runs):
    _, _, results, _ = runs
    _, test = _data()
    outputs, targets = _predict(_fixed_classifier(), test)
    assert len(outputs) == N_TEST
    for res in results:
        assert torch.equal(res["targets"], targets)        # every image once, in the dataset's order
        assert torch.equal(res["outputs"], outputs)


@pytest.mark.slow
def test_run_finetune_creates_and_leaves_the_process_group(runs):
    _, _, results, task = runs
    for res in results:
        assert not res["group_before"] and not res["group_after"]
    assert results[0]["rf_result"] == results[1]["rf_result"]
    # one model on both ranks, the feature BatchNorm's running statistics (each rank's own shares
    # on CPU) included: rank 0's are given to every rank after each step
    state = [res["rf_state"] for res in results]
    assert state[0]["feature_norm.running_mean"].abs().sum() > 0
    for k in state[0]:
        assert torch.equal(state[0][k], state[1][k]), k
    rf = json.loads(results[0]["rf_result"])
    assert rf["mode"] == "linear" and rf["steps"] == 3          # ceil(1437 / 480)
    assert rf["train_images"] == 1437 and rf["test_images"] == 360
    assert (task / "rf0" / "classifier.safetensors").is_file() and not (task / "rf1").exists()


@pytest.mark.slow
def test_torchrun_keel_finetune(tmp_path):
    """The command the README gives, end to end: ``torchrun --nproc_per_node 2 -m keel finetune``."""
    run_dir = tmp_path / "run"
    # --standalone: torchrun finds a free port itself (no window for another process to take it)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "keel", "finetune", "--out", str(run_dir),
           "model.backbone=random:resnet10_cifar", "data.source=digits", "data.img_size=8", "train.epochs=2",
           "train.batch_size=480", "task.mode=linear", "train.device=cpu", "data.num_workers=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s]
    lines = [r for r in lines if "top1" in r]                                     # the evaluations
    assert [r["epoch"] for r in lines] == [1, 2] and [r["step"] for r in lines] == [3, 6]   # written once
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 6 and result["final"]["top1"] == lines[-1]["top1"]
    assert (run_dir / "classifier.safetensors").is_file() and (run_dir / "curves.png").is_file()


@pytest.mark.slow
def test_new_collectives(runs):
    _, _, results, _ = runs
    for res in results:
        torch.testing.assert_close(res["gathered"], torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]]))
        assert res["gathered_bool"].tolist() == [True, True, False, False, False]
        assert res["buffers"]["running_mean"].tolist() == [1.0, 1.0]
        assert int(res["buffers"]["num_batches_tracked"]) == 5


def test_one_process_helpers_are_no_ops():
    x = torch.randn(3, 2)
    assert D.all_gather_cat(x) is x
    bn = torch.nn.BatchNorm1d(2)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    D.broadcast_buffers(bn)
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
