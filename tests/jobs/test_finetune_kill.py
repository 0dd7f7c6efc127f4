"""A fine-tuning run killed with SIGKILL in the middle of an epoch, then resumed with
``keel finetune --resume``, ends bit-identical to a run that was never stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from keel.engine.checkpoint import load_checkpoint

# digits: 1437 training images, batch 128 -> 12 steps an epoch; a checkpoint every 5 steps
ARGS = ["model.backbone=random:resnet10_cifar", "data.source=digits", "data.img_size=16", "data.num_workers=0",
        "train.batch_size=128",
        "train.epochs=2", "train.warmup_epochs=0.5", "train.ckpt_every=5", "train.log_every=1",
        "train.device=cpu", "train.seed=3"]


def _keel(*args: str, **kw) -> subprocess.Popen:
    # one thread in both runs: bit-identical results need the same order of float sums
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "keel", "finetune", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    unbroken = _keel(*ARGS, "--out", str(tmp_path / "a"))
    broken = _keel(*ARGS, "--out", str(tmp_path / "b"))
    ckpt = tmp_path / "b" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and broken.poll() is None:
        if ckpt.is_file():
            try:
                step = load_checkpoint(ckpt)["step"]
            except Exception:       # caught between the write and the rename: read again
                step = 0
            if step >= 5:
                break
        time.sleep(0.05)
    assert broken.poll() is None, f"the run ended before it could be killed: {broken.stderr.read()[-2000:]}"
    os.kill(broken.pid, signal.SIGKILL)
    broken.wait()
    saved = load_checkpoint(ckpt)["step"]
    assert saved % 12 != 0, f"the checkpoint kept is at an epoch's end (step {saved}), not mid-epoch"
    assert not (tmp_path / "b" / "result.json").exists()

    resumed = _keel("--resume", str(tmp_path / "b"))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert unbroken.wait(timeout=600) == 0, unbroken.stderr.read()[-2000:]
    a, b = load_file(tmp_path / "a" / "classifier.safetensors"), load_file(tmp_path / "b" / "classifier.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("a", "b"))
    assert ra["final"] == rb["final"] and ra["best"] == rb["best"] and ra["steps"] == rb["steps"] == 24
    lines = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    strip = [[{k: v for k, v in r.items() if k != "img_per_s"} for r in recs] for recs in lines]
    assert strip[0] == strip[1]                                 # every loss and metric line, none twice
