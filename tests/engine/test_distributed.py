"""Multi-process training on CPU (gloo): the collectives, SimCLR's gathered loss under DDP, and
the whole trainer under torchrun.

The 2-process checks run this file as a script in two worker processes, each given the
environment torchrun would give it (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK), so
keel's own ``init_distributed`` joins the group. The workers read their inputs from, and write
their results to, files in a temporary folder; all checks share one launch (starting a process
that imports torch costs seconds).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import keel
from keel.config import RunConfig
from keel.engine import distributed as D
from keel.tasks.ssl import build_method

WORLD = 2
BATCH = 8  # images per view in the combined batch; each rank holds BATCH // WORLD


def _build_method():
    """SimCLR on a small ViT: no BatchNorm in the backbone, only in the projector."""
    cfg = RunConfig()
    cfg.data.img_size = 16
    cfg.method.proj_hidden_dim = 32
    cfg.method.proj_dim = 16
    cfg.method.temperature = 0.2
    backbone = keel.create_model("vit_tiny_patch4_32", img_size=16, depth=2, dim=48, num_heads=3)
    return build_method("simclr", backbone, cfg)


def _bn_eval(module: nn.Module) -> None:
    # In training mode BatchNorm normalizes with the statistics of the batch it sees: with two
    # processes each projector BN would see half the batch, and CPU/gloo has no SyncBatchNorm to
    # share the statistics, so the two runs would differ by design. In eval mode BN is a fixed
    # per-sample affine map, which isolates what is tested here: the gathered negatives, the
    # gradient of the gather and DDP's averaging. Done identically in both runs.
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _pair_loss(local: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """A loss that mixes every local row with every gathered row, averaged over local rows:
    its mean over ranks equals its value on one process holding the whole batch."""
    return ((local @ keys.T) ** 2).sum(1).mean()


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = len(x) // world
    return x[rank * n:(rank + 1) * n]


# ---------------------------------------------------------------- worker (run as a script)
def _worker(task: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    info = D.init_distributed("cpu")
    r, w = info.rank, info.world_size
    inp = torch.load(task / "inputs.pt", weights_only=True)
    out: dict = {"info": [info.rank, info.world_size, info.local_rank, str(info.device)],
                 "world_size": D.world_size(), "rank": D.rank()}

    t = torch.tensor([float(r + 1), -float(r)])
    out["mean"] = D.all_reduce_mean(t)
    out["max"] = D.all_reduce_max(t)
    out["t_after"] = t.clone()  # the helpers must not modify their input
    D.barrier()

    # main_first: rank 0's block (slow, writes a file) is over before rank 1's begins
    import time
    with D.main_first():
        if r == 0:
            time.sleep(0.5)
            (task / "listed-by-0").write_text("x")
        out["saw_rank0_file"] = (task / "listed-by-0").is_file()

    # gather_with_grad alone, on a tiny linear model wrapped in DDP
    lin = nn.Linear(3, 2)
    lin.load_state_dict(inp["lin"])
    ddp_lin = DDP(lin)
    y = ddp_lin(_shard(inp["x"], r, w))
    keys = D.gather_with_grad(y)
    loss = _pair_loss(y, keys)
    loss.backward()
    out["lin_keys"] = keys.detach()
    out["lin_loss"] = loss.detach()
    out["lin_grads"] = {k: p.grad.clone() for k, p in lin.named_parameters()}

    # the backward of the gather: each rank gets the sum over ranks of the gradient of its slice,
    # and the caller's grad_outputs tensor is left as it was
    leaf = torch.zeros(2, 2, requires_grad=True)
    gathered = D.gather_with_grad(leaf)
    grad_out = torch.arange(8.0).view(4, 2) + r * 100
    grad_out_copy = grad_out.clone()
    (g_leaf,) = torch.autograd.grad(gathered, leaf, grad_outputs=grad_out)
    out["gather_shape"] = list(gathered.shape)
    out["gather_grad"] = g_leaf
    out["grad_out_unchanged"] = bool(torch.equal(grad_out, grad_out_copy))

    # SimCLR on a ViT, wrapped in DDP, each rank with its half of both views
    method = _build_method()
    method.load_state_dict(inp["method"])
    method.train()
    _bn_eval(method)
    ddp = DDP(method)
    x1, x2 = inp["views"]
    res = ddp((_shard(x1, r, w), _shard(x2, r, w)))
    res["loss"].backward()
    out["loss"] = res["loss"].detach()
    out["grads"] = {k: p.grad.clone() for k, p in method.named_parameters()}

    torch.save(out, task / f"rank{r}.pt")
    D.barrier()
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- launching the workers
def _run_both(task: Path, launch):
    """Write the inputs to ``task``, run the workers, and compute the one-process reference."""
    torch.manual_seed(0)
    method = _build_method()
    lin = nn.Linear(3, 2)
    g = torch.Generator().manual_seed(1)
    views = (torch.randn(BATCH, 3, 16, 16, generator=g), torch.randn(BATCH, 3, 16, 16, generator=g))
    x = torch.randn(4, 3, generator=g)
    torch.save({"method": method.state_dict(), "lin": lin.state_dict(), "views": views, "x": x},
               task / "inputs.pt")
    results = launch(__file__, task, WORLD)

    # one process, whole batch, same weights and the same BN treatment
    method.train()
    _bn_eval(method)
    ref_loss = method(views)["loss"]
    ref_loss.backward()
    y = lin(x)
    lin_loss = _pair_loss(y, y)
    lin_loss.backward()
    ref = {"loss": ref_loss.detach(), "grads": {k: p.grad.clone() for k, p in method.named_parameters()},
           "lin_keys": y.detach(), "lin_loss": lin_loss.detach(),
           "lin_grads": {k: p.grad.clone() for k, p in lin.named_parameters()}}
    return ref, results


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, launch_workers):
    """(one-process reference, [rank 0 results, rank 1 results]), computed once for the module."""
    return _run_both(tmp_path_factory.mktemp("ddp"), launch_workers)


@pytest.mark.slow
def test_collectives_in_two_processes(ddp_run):
    _, results = ddp_run
    for r, res in enumerate(results):
        assert res["info"] == [r, WORLD, r, "cpu"]
        assert res["world_size"] == WORLD and res["rank"] == r
        assert res["saw_rank0_file"]
        torch.testing.assert_close(res["mean"], torch.tensor([1.5, -0.5]))
        torch.testing.assert_close(res["max"], torch.tensor([2.0, 0.0]))
        torch.testing.assert_close(res["t_after"], torch.tensor([float(r + 1), -float(r)]))


@pytest.mark.slow
def test_gather_with_grad_forward_and_backward(ddp_run):
    ref, results = ddp_run
    for r, res in enumerate(results):
        assert res["gather_shape"] == [4, 2]
        # d(sum_r' <grad_out_r', gathered>)/d leaf_r = sum over ranks of the rows of slice r
        rows = torch.arange(8.0).view(4, 2)[2 * r:2 * r + 2]
        torch.testing.assert_close(res["gather_grad"], 2 * rows + 100)
        assert res["grad_out_unchanged"], "gather_with_grad's backward modified the caller's gradient in place"
        # forward: every rank sees the whole batch, in rank order
        torch.testing.assert_close(res["lin_keys"], ref["lin_keys"], atol=1e-6, rtol=1e-5)
    mean_loss = sum(res["lin_loss"] for res in results) / WORLD
    torch.testing.assert_close(mean_loss, ref["lin_loss"], atol=1e-6, rtol=1e-6)
    for res in results:
        for k, g in ref["lin_grads"].items():
            torch.testing.assert_close(res["lin_grads"][k], g, atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.slow
def test_simclr_two_processes_match_one_process(ddp_run):
    ref, results = ddp_run
    losses = [res["loss"].item() for res in results]
    assert losses[0] != losses[1]  # each rank's loss is over its own anchors
    assert sum(losses) / WORLD == pytest.approx(ref["loss"].item(), abs=1e-6)
    assert set(results[0]["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        assert g.abs().sum() > 0, name
        for res in results:
            if name == "backbone.cls_token":
                # The class token starts at std 1e-6 (as in timm): the first LayerNorm divides it
                # by sqrt(var + eps) ~ 1e-3, so its gradient is a sum of large terms (max ~1e2
                # here) that partly cancel. The float32 round-off of that sum is ~1e-7 of the
                # tensor's largest entry but exceeds atol 1e-6 on near-zero entries, whatever the
                # number of processes; compare it relative to its own scale instead.
                err = (res["grads"][name] - g).abs().max().item()
                assert err <= 1e-6 + 1e-5 * g.abs().max().item(), (name, err)
            else:
                torch.testing.assert_close(res["grads"][name], g, atol=1e-6, rtol=1e-5, msg=name)
        assert torch.equal(results[0]["grads"][name], results[1]["grads"][name])  # DDP synced them


# ---------------------------------------------------------------- one process: no-ops
def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert info.is_main and not D.DistInfo(rank=1).is_main
    assert D.world_size() == 1 and D.rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert D.gather_with_grad(x) is x
    assert D.all_reduce_mean(x) is x and D.all_reduce_max(x) is x
    D.barrier()
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device("cuda", local_rank=3) == torch.device("cuda:3")
    if not torch.cuda.is_available():
        assert D.resolve_device("auto") == torch.device("cpu")


# ---------------------------------------------------------------- the whole trainer under torchrun
@pytest.mark.slow
def test_torchrun_pretrain_two_processes(tmp_path, free_port):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "keel", "pretrain", "--out", str(run_dir),
           "data.source=digits", "data.subset=256", "data.img_size=8", "model.name=resnet10_cifar",
           "method.proj_hidden_dim=64", "method.proj_dim=32",
           "train.batch_size=64", "train.epochs=1", "train.knn_every=0", "train.log_every=1",
           "train.device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # the NHWC activations' weight gradients have the parameters' own strides (no DDP warning)
    assert "Grad strides do not match" not in proc.stderr
    assert (run_dir / "backbone.safetensors").is_file()
    assert (run_dir / "card.json").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s]
    steps = [rec["step"] for rec in lines if "loss" in rec]
    assert steps == [1, 2, 3, 4]  # 256 images / global batch 64, logged every step, once (rank 0 only)
    assert all(math.isfinite(rec["loss"]) for rec in lines)
    card = json.loads((run_dir / "card.json").read_text())
    assert card["steps"] == 4 and card["finished"] is True
    # the exported backbone loads back
    backbone = keel.load_backbone(run_dir)
    assert backbone(torch.zeros(2, 3, 8, 8)).shape == (2, backbone.num_features)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
