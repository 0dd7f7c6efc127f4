"""Shared fixtures: a tiny, fast run configuration (seconds on 2 CPU cores)."""
from __future__ import annotations

import pytest
import torch

from keel.config import load_config

# digits at 8x8, a 256-image subset, batch 64 -> 4 steps per epoch; no kNN monitor, a metric
# line every step. Small projector so that the head costs nothing next to the backbone.
TINY_OVERRIDES = [
    "data.source=digits",
    "data.img_size=8",
    "data.subset=256",
    "data.num_workers=0",
    "model.name=resnet10_cifar",
    "method.proj_hidden_dim=64",
    "method.proj_dim=32",
    "train.batch_size=64",
    "train.epochs=2",
    "train.warmup_epochs=0.5",
    "train.knn_every=0",
    "train.log_every=1",
    "train.device=cpu",
]
TINY_STEPS_PER_EPOCH = 256 // 64


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # One intra-op thread for the whole suite: runs that are compared bit for bit must sum floats
    # in the same order, and on a 2-core box the tiny tensors here only lose to thread hand-offs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_overrides(tmp_path):
    """The tiny config as CLI-style ``key=value`` overrides, writing under tmp_path."""
    return TINY_OVERRIDES + [f"train.out_dir={tmp_path / 'runs'}"]


@pytest.fixture(scope="session")
def tiny_cfg_factory(tmp_path_factory):
    """Session-wide ``make("train.epochs=1", ...)`` -> the tiny RunConfig with extra overrides."""
    out_dir = tmp_path_factory.mktemp("runs")

    def make(*extra: str):
        return load_config(None, TINY_OVERRIDES + [f"train.out_dir={out_dir}", *extra])
    return make


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg("train.epochs=1", ...)`` -> the tiny RunConfig with extra overrides on top."""
    def make(*extra: str):
        return load_config(None, TINY_OVERRIDES + [f"train.out_dir={tmp_path / 'runs'}", *extra])
    return make


@pytest.fixture
def tiny_cfg(make_cfg):
    return make_cfg()


def _free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, task, world: int = 2, timeout: float = 180) -> list[dict]:
    """Run ``python script task`` in ``world`` processes with torchrun's environment (gloo on CPU),
    and return each rank's ``task/rank{r}.pt``. The script's worker joins the group through
    ``keel.engine.distributed.init_distributed("cpu")`` and saves its results there."""
    from pathlib import Path

    for _ in range(3):
        procs, logs = _start_workers(script, task, world, timeout)
        # _free_port's port can be taken by another process before rank 0 binds it: try another
        if not (any(p.returncode for p in procs) and any("address already in use" in log.lower() for log in logs)):
            break
    # gloo's threads can abort a process at exit ("terminate called without an active exception")
    # after it wrote its results: that is torch's teardown, not the test's subject
    at_exit = all((Path(task) / f"rank{r}.pt").is_file() for r in range(world)) and all(
        p.returncode == 0 or "terminate called without an active exception" in log for p, log in zip(procs, logs))
    if any(p.returncode for p in procs) and not at_exit:
        raise AssertionError("worker failed:\n" + "\n".join(f"--- rank {r} (exit {p.returncode})\n{log[-4000:]}"
                                                             for r, (p, log) in enumerate(zip(procs, logs))))
    return [torch.load(Path(task) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _start_workers(script: str, task, world: int, timeout: float):
    import os
    import subprocess
    import sys

    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(task)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return procs, logs


class Killed(Exception):
    """What :func:`kill_at_step` raises: a run that dies mid-way (a kill, a lost node)."""


@pytest.fixture
def kill_at_step(monkeypatch):
    """``with kill_at_step(TaskClass, n): run()``: the task's n-th training step raises
    :class:`Killed` (and the block expects it); the step is restored afterwards."""
    import contextlib

    @contextlib.contextmanager
    def kill(cls, n: int):
        real, calls = cls.training_step, []

        def step(self, batch):
            calls.append(1)
            if len(calls) == n:
                raise Killed
            return real(self, batch)
        with monkeypatch.context() as m, pytest.raises(Killed):
            m.setattr(cls, "training_step", step)
            yield
    return kill


@pytest.fixture(scope="session")
def free_port():
    """``free_port()`` -> a TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    return _free_port


@pytest.fixture(scope="session")
def launch_workers():
    """``launch_workers(__file__, task_dir)`` -> [rank 0 results, rank 1 results]; see ``launch``."""
    return launch
