"""Process-group set-up from torchrun's environment, and collectives that keep gradients.

A plain ``python`` run is world size 1 and every helper here is then a no-op, so the same code
runs on one process or many (``torchrun --nproc_per_node=N``) with no change.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if pref == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(pref)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU), if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=_timeout())
    return DistInfo(rank, world, local_rank, dev)


def _timeout() -> timedelta:
    """How long a collective (and the group's first connection) may wait: KEEL_DIST_TIMEOUT
    seconds, default 30 minutes as torch's. A group torchrun restarted after a failure can hang while
    connecting (gloo, seen on a loaded machine); it then fails after this long and torchrun tries
    again (--max_restarts)."""
    return timedelta(seconds=float(os.environ.get("KEEL_DIST_TIMEOUT", "1800")))


def ensure_group(device: torch.device) -> None:
    """A process group even for one process (FSDP needs a device mesh): a one-member group when
    torchrun made none."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def restarted() -> bool:
    """Whether torchrun restarted this group after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a run directory name, a file list)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """The block runs on rank 0 first, then on the others (rank 0 lists a folder and caches the
    list; the others read the cache)."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank the gradient of its own slice, summed over
    the ranks' losses. With DDP's gradient averaging on top, the parameter gradients equal those
    of one process that saw the whole batch and the mean of the per-rank losses."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        # A copy: all_reduce works in place, and the incoming gradient may be a tensor the caller
        # still holds (e.g. grad_outputs given to backward / autograd.grad).
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n:(r + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), keeping gradients."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, in rank order, without gradients. Unlike
    :func:`gather_with_grad` the ranks' first dimensions may differ (a test set cut into
    near-equal shards); the other dimensions and the dtype must agree."""
    if world_size() == 1:
        return x
    # the sizes first, then every shard padded to the largest (all_gather moves equal shapes)
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    as_bool = x.dtype == torch.bool           # moved as uint8: not every backend takes bool
    x = x.to(torch.uint8) if as_bool else x
    padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))]).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    return out.bool() if as_bool else out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers of ``module`` (BatchNorm running statistics, which
    each rank updates from its own shard when BatchNorm is not synchronised), one collective per
    dtype."""
    if world_size() == 1:
        return
    buffers = list(module.buffers())
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        same = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in same])
        dist.broadcast(flat, src)
        for b, v in zip(same, flat.split([b.numel() for b in same])):
            b.copy_(v.view_as(b))


def seed_for(*parts: int) -> int:
    """A seed for the random stream of (seed, step, rank, ...): a fixed mixing of the parts, so
    every process and step gets a distinct, stable stream without Python's hash()."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
    return h
