"""keel.run: a job from a config in this process (the entry of Ray Train and other Python launchers),
and the launch recipes in examples/ that can be checked here."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

import keel
from keel.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = {"data": {"source": "digits", "img_size": 8, "subset": 64, "num_workers": 0},
        "model": {"name": "resnet10_cifar"}, "method": {"proj_hidden_dim": 32, "proj_dim": 16},
        "train": {"batch_size": 32, "epochs": 1, "knn_every": 0, "device": "cpu"}}


def test_run_takes_a_dict_a_file_and_overrides_and_resumes(tmp_path):
    res = keel.run("pretrain", TINY, ["train.max_steps=1"], out=tmp_path / "a")
    assert res["steps"] == 1 and (tmp_path / "a" / "backbone.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["data"]["subset"] == 64 and saved["train"]["max_steps"] == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    res = keel.run("pretrain", str(cfg), out=tmp_path / "a", resume=True, overrides=["train.max_steps=2"])
    assert res["steps"] == 2                                  # continued from step 1
    with pytest.raises(ConfigError, match="job must be one of"):
        keel.run("train", TINY)
    with pytest.raises(ConfigError, match="needs out"):
        keel.run("pretrain", TINY, resume=True)


def test_the_ray_entry_runs_a_job_without_ray(tmp_path):
    spec = importlib.util.spec_from_file_location("ray_train", ROOT / "examples" / "ray_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)              # ray is imported only in main()
    module.train_loop_per_worker({"job": "finetune", "config": None, "out": str(tmp_path / "ft"),
                                  "overrides": ["model.backbone=random:resnet10_cifar", "data.source=digits",
                                                "data.img_size=8", "train.epochs=1", "train.device=cpu",
                                                "data.num_workers=0", "task.mode=linear"]})
    assert json.loads((tmp_path / "ft" / "result.json").read_text())["steps"] > 0


def test_the_kubernetes_job_runs_the_sbatch_torchrun_line():
    job = yaml.safe_load((ROOT / "examples" / "k8s-pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob"
    command = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"][0]
    sbatch = next(line for line in (ROOT / "examples" / "slurm.sbatch").read_text().splitlines()
                  if line.startswith("srun torchrun "))
    flags = lambda line: {w.split("=")[0] for w in line.split() if w.startswith("--")}   # noqa: E731
    assert {"--nnodes", "--nproc_per_node", "--rdzv_id", "--rdzv_backend", "--rdzv_endpoint",
            "--max_restarts"} <= flags(command) & flags(sbatch)
    assert "-m keel pretrain --out" in command
