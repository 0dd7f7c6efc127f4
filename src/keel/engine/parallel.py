"""Large models on many processes: FSDP2 sharding, activation checkpointing, sharded checkpoints.

``train.parallel=fsdp`` trains a sharded copy of the task: ``fully_shard`` on every block (the
innermost modules kept in a ModuleList or Sequential that hold parameters of their own children:
transformer blocks, residual blocks), then on the whole task, so each process keeps 1/N of the
parameters, gradients and optimizer state and gathers a block's weights only while it runs. The
caller's task keeps its structure but gives up its parameter storage for the run; at the end the
full weights are gathered into it again, so export, evaluation and everything after ``fit`` see a
plain module, as after a DDP run.

Sharded checkpoints go through ``torch.distributed.checkpoint``: every process writes its shard
into ``checkpoints/dcp-<step>/``; only once all have written does rank 0 point
``checkpoints/last.json`` at it (an atomic rename), so a save killed half-way is never loaded. A
checkpoint loads on any number of processes (DCP reshards on load).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from keel.files import atomic_write_text
from keel.engine import distributed as D

POINTER = "last.json"


def _fsdp():
    """``fully_shard`` and ``MixedPrecisionPolicy`` (public from torch 2.6; _composable in 2.4-2.5)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def units(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model``: modules kept in a ModuleList or Sequential that have parameters and
    children of their own (transformer blocks, residual blocks). A block made mostly of such
    blocks (a Swin stage) gives its blocks instead; one that only holds small ones (a CSWin block's
    positional convolutions) is the block."""
    out = []
    for candidate in _candidates(model):
        inner = _candidates(candidate)
        if inner and sum(_numel(m) for m in inner) >= 0.5 * _numel(candidate):
            out += units(candidate)
        else:
            out.append(candidate)
    return list({id(m): m for m in out}.values())     # a module reachable twice is one block


def _candidates(module: nn.Module) -> list[nn.Module]:
    """The outermost modules under ``module`` that sit in a ModuleList/Sequential and have
    parameters and children."""
    found = []
    for child in module.children():
        in_list = isinstance(module, (nn.ModuleList, nn.Sequential))
        if in_list and any(True for _ in child.children()) and _numel(child):
            found.append(child)
        else:
            found += _candidates(child)
    return found


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of keeping them: only the
    blocks' inputs stay in memory. The block's ``forward`` is wrapped on the instance, so names
    and state dicts do not change. Returns the number of blocks."""
    blocks = units(model)
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)


def shard(task: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> nn.Module:
    """A sharded copy of ``task`` on ``device``; ``task`` keeps its buffers and structure but its
    parameters give up their storage until :func:`restore` (so the run holds one copy, sharded)."""
    fully_shard, MixedPrecisionPolicy = _fsdp()
    from torch.distributed.device_mesh import init_device_mesh
    sharded = copy.deepcopy(task)
    for p in sharded.parameters():      # FSDP shards flat storage: channels-last conv weights go plain
        p.data = p.data.contiguous()
    for p in task.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    mesh = init_device_mesh(device.type, (D.world_size(),))
    # bf16 weights in forward/backward on GPU, gradients reduced and kept in float32
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) \
        if amp_dtype is not None and device.type == "cuda" else MixedPrecisionPolicy()
    for block in units(sharded):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(sharded, mesh=mesh, mp_policy=mp)
    return sharded.to(device)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """The sharded task's own weights (those outside its blocks) gathered for the duration, so
    evaluation can call its parts directly (``task.model(x)``, ``backbone.embed(x)``) and not only
    through ``task(batch)``; the blocks gather theirs as they run. A collective: every process
    enters it. A no-op for a module that is not sharded."""
    if not hasattr(model, "unshard"):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def full_state_dict(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank gets the full, unsharded state dict (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))


def restore(task: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Give ``task`` (emptied by :func:`shard`) its full weights back."""
    for name, p in task.named_parameters():
        p.data = torch.empty_like(full[name], device=full[name].device)
    task.load_state_dict(full)


def local_numel(module: nn.Module) -> int:
    """Parameters this process holds (its shards, for a sharded module)."""
    return sum(local_tensor(p).numel() for p in module.parameters())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2's parameters, gradients, optimizer state); a plain
    tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


# ------------------------------------------------------------------------------- checkpoints
def save_sharded(ckpt_dir: Path, step: int, model: nn.Module, optimizer, meta: dict) -> None:
    """Every rank writes its shard of model and optimizer state; rank 0 writes ``meta`` (step,
    history, config, hooks) and then moves the pointer. Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    target = ckpt_dir / f"dcp-{step:09d}"
    if D.rank() == 0 and target.exists():       # a save of this step that never finished
        shutil.rmtree(target)
    D.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(target))
    D.barrier()                                  # every shard is on disk
    if D.rank() == 0:
        torch.save(meta, target / "meta.pt")
        atomic_write_text(ckpt_dir / POINTER, json.dumps({"dir": target.name, "step": step,
                                                          "world_size": D.world_size()}))
        for old in ckpt_dir.glob("dcp-*"):
            if old.name != target.name:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()


def sharded_checkpoint(ckpt_dir: Path) -> Path | None:
    """The directory ``last.json`` points at, or None."""
    pointer = ckpt_dir / POINTER
    if not pointer.is_file():
        return None
    return ckpt_dir / json.loads(pointer.read_text())["dir"]


def load_sharded(where: Path, model: nn.Module, optimizer) -> dict:
    """Load a :func:`save_sharded` checkpoint into ``model``/``optimizer`` sharded over however many
    processes run now; returns its meta. The tensors and meta.pt load without running code, but
    torch.distributed.checkpoint unpickles its own ``.metadata`` file (torch 2.4-2.14): resume
    sharded runs from directories you trust (docs/scale.md)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(where))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(where / "meta.pt", weights_only=True)
