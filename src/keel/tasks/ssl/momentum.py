"""EMA ("momentum") copies of a network, for BYOL, MoCo v3 and DINO teachers."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy: same weights now, never trained by the optimizer."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: base at step 0, rising along a half cosine to ``final`` at the end."""
    if total_steps <= 0:
        return final
    t = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * t) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """teacher = m * teacher + (1 - m) * student, for parameters; buffers (BN statistics) copied."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, 1.0 - m)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)
