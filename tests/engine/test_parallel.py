"""FSDP2, activation checkpointing and sharded checkpoints (keel.engine.parallel).

The 2-process checks run this file as a script in two worker processes (the environment torchrun
gives, gloo on the CPU); the resume checks run ``keel pretrain`` under torchrun and alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import keel
from keel.engine import parallel

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.source=digits", "data.subset=128", "data.num_workers=0", "method.proj_hidden_dim=32",
        "method.proj_dim=16", "train.batch_size=32", "train.knn_every=0", "train.log_every=1", "train.device=cpu"]


# ---------------------------------------------------------------- blocks and activation checkpointing
def test_units_are_the_innermost_blocks_of_every_family():
    vit = keel.create_model("vit_tiny_patch4_32", depth=3)
    assert parallel.units(vit) == list(vit.blocks)
    swin = keel.create_model("swin_tiny", img_size=64)
    blocks = parallel.units(swin)
    assert len(blocks) == 12 and {type(b).__name__ for b in blocks} == {"SwinBlock"}     # not the stages
    for name in ("resnet10_cifar", "keel_tiny", "cswin_tiny", "resnetv2_50x1_bit"):
        model = keel.create_model(name)
        found = parallel.units(model)
        # every parameter outside the blocks belongs to the stem, the norms or the head
        inside = sum(p.numel() for b in found for p in b.parameters())
        assert len(found) >= 4 and inside > 0.8 * sum(p.numel() for p in model.parameters()), name


def _saved_bytes(model, x) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for backward during one forward, and the gradients."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.embed(x).pow(2).mean()
    loss.backward()
    return total[0], [p.grad.clone() for p in model.parameters()]


def test_activation_checkpointing_keeps_gradients_and_saves_memory():
    torch.manual_seed(0)
    model = keel.create_model("vit_tiny_patch4_32", depth=4)
    x = torch.randn(8, 3, 32, 32)
    plain_bytes, plain_grads = _saved_bytes(model, x)
    assert parallel.checkpoint_activations(model) == 4
    ckpt_bytes, ckpt_grads = _saved_bytes(model, x)
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert ckpt_bytes < 0.3 * plain_bytes                      # measured: about a fifth
    assert set(model.state_dict()) == set(keel.create_model("vit_tiny_patch4_32", depth=4).state_dict())


# ---------------------------------------------------------------- FSDP = DDP on two processes
def _worker(task: Path) -> None:
    from keel.config import load_config
    from keel.data.sources import training_data
    from keel.engine import distributed as D
    from keel.engine.hooks import Hook
    from keel.engine.trainer import Trainer
    from keel.models.registry import create_model, model_kwargs
    from keel.tasks.ssl import build_method
    torch.set_num_threads(1)
    D.init_distributed("cpu")
    out = {}

    class Count(Hook):
        def after_step(self, trainer):
            if trainer.step == 1:
                opt = trainer.optimizer.state.values()
                out[key] = {"params": parallel.local_numel(trainer.task),
                            "optim": sum(getattr(v, "_local_tensor", v).numel() for s in opt for v in s.values()
                                         if torch.is_tensor(v) and v.dim() > 0)}

    for model, size in (("vit_tiny_patch4_32", 16), ("keel_tiny", 32)):
        for mode in ("ddp", "fsdp"):
            key = f"{model}/{mode}"
            cfg = load_config(None, TINY + [f"model.name={model}", f"data.img_size={size}", "method.name=mocov3",
                                            "train.epochs=5", f"train.parallel={mode}", "train.ckpt_every=10"])
            run = task / key.replace("/", "-")
            torch.manual_seed(0)
            method = build_method("mocov3", create_model(model, **model_kwargs(cfg)), cfg)
            Trainer(cfg, run, quiet=True).fit(method, training_data(cfg.data.source, size, subset=128), [Count()])
            out[key]["weights"] = {k: v.detach().clone() for k, v in method.export_backbone().state_dict().items()}
    torch.save(out, task / f"rank{D.rank()}.pt")


@pytest.fixture(scope="module")
def fsdp_vs_ddp(tmp_path_factory, launch_workers):
    task = tmp_path_factory.mktemp("fsdp")
    return task, launch_workers(__file__, task, 2, timeout=600)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vit_tiny_patch4_32", "keel_tiny"])
def test_fsdp_trains_like_ddp_and_holds_half_of_everything(fsdp_vs_ddp, model):
    task, ranks = fsdp_vs_ddp
    ddp, fsdp = _losses(task / f"{model}-ddp"), _losses(task / f"{model}-fsdp")
    assert len(ddp) == len(fsdp) == 20                          # 128 images / 32 a step, 5 epochs
    assert fsdp == pytest.approx(ddp, abs=1e-5)
    for r in ranks:                                             # every rank ends with the full weights
        for k, v in r[f"{model}/ddp"]["weights"].items():
            torch.testing.assert_close(r[f"{model}/fsdp"]["weights"][k], v, rtol=1e-4, atol=1e-5)
    whole = ranks[0][f"{model}/ddp"]
    shards = [r[f"{model}/fsdp"] for r in ranks]
    assert sum(s["params"] for s in shards) >= whole["params"]              # padding aside, all of it
    assert all(s["params"] <= 0.501 * whole["params"] for s in shards)      # half each (rows padded)
    assert all(s["optim"] <= 0.501 * whole["optim"] for s in shards)
    # sharded checkpoints: one folder, a shard per process, and the pointer
    ckpt = task / f"{model}-fsdp" / "checkpoints"
    pointed = json.loads((ckpt / "last.json").read_text())
    assert pointed["step"] == 20 and len(list((ckpt / pointed["dir"]).glob("*.distcp"))) == 2


# ---------------------------------------------------------------- sharded checkpoints, other process counts
def _pretrain(run: Path, world: int, port: int, *extra: str) -> None:
    """``keel pretrain`` (FSDP, MAE on a tiny ViT) into ``run``, on ``world`` processes; resumes
    when the run exists."""
    keel_args = ["pretrain", "--resume" if (run / "config.yaml").is_file() else "--out", str(run), *TINY,
                 "model.name=vit_tiny_patch4_32", "data.img_size=16", "method.name=mae", "train.epochs=2",
                 "train.parallel=fsdp", "train.ckpt_every=2", *extra]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
                f"--master_port={port}"] if world > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, *launcher, "-m", "keel", *keel_args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path, free_port, first, then):
    run = tmp_path / "run"
    _pretrain(run, first, free_port(), "train.max_steps=4")
    at_stop = load_file(run / "backbone.safetensors")
    (run / "backbone.safetensors").rename(run / "first.safetensors")
    _pretrain(run, then, free_port(), "train.max_steps=4")        # loads, takes no step, exports
    again = load_file(run / "backbone.safetensors")
    assert all(torch.equal(at_stop[k], again[k]) for k in at_stop)   # the shards became the same weights
    _pretrain(run, then, free_port(), "train.max_steps=0")         # and the run goes on to its end
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert json.loads((run / "card.json").read_text())["finished"] is True


def test_a_killed_save_is_never_loaded(tmp_path):
    """The pointer moves only after every shard is written: a half-written folder is ignored."""
    ckpt = tmp_path / "checkpoints"
    (ckpt / "dcp-000000004").mkdir(parents=True)
    (ckpt / "dcp-000000006").mkdir()                               # a save that died before the pointer
    (ckpt / "last.json").write_text(json.dumps({"dir": "dcp-000000004", "step": 4, "world_size": 2}))
    assert parallel.sharded_checkpoint(ckpt) == ckpt / "dcp-000000004"
    assert parallel.sharded_checkpoint(tmp_path / "none") is None


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
