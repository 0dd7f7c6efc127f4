"""Optimizers and schedules: parameter groups without weight decay on norms and biases, LARS,
and a per-step warm-up + cosine learning rate."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights of matrices/kernels decay; norms, biases, tokens and position
    embeddings (every parameter with fewer than 2 dims, plus tokens) do not."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "dist_token", "mask_token")):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    # "names" travels in the optimizer's state dict: staged training maps state by parameter name.
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, "names": no_decay_names},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017), as SimCLR uses it:
    the update of each weight tensor is scaled by ``eta * ||w|| / ||g + wd * w||``. Groups marked
    ``lars_exclude`` (norms, biases) get plain SGD with momentum and no weight decay."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not g["lars_exclude"]:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    state["momentum_buffer"].mul_(g["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-g["lr"])
        return loss


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9,
                    fused: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    if name == "sgd":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}' (adamw | lars | sgd)")


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then half a cosine from base_lr to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))
