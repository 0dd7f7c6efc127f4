"""Optimizers and schedules: parameter groups without weight decay on norms and biases, LARS,
a per-step warm-up + cosine (or step) learning rate, a cosine weight-decay schedule, and layer
ids for layer-wise lr decay."""
from __future__ import annotations

import math
import re

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


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                    fused: bool = False) -> torch.optim.Optimizer:
    """AdamW, SGD (with momentum) or LARS over ``params``: a module (its :func:`param_groups`
    with ``weight_decay``) or a list of groups already made (each carrying its weight decay)."""
    groups = param_groups(params, weight_decay) if isinstance(params, nn.Module) else params
    if name == "lars":
        for g in groups:  # groups without decay (norms, biases) get plain SGD, as SimCLR's LARS
            g.setdefault("lars_exclude", g["weight_decay"] == 0)
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer '{name}' (adamw | lars | sgd)")


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then half a cosine from base_lr to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def step_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
            milestones=(0.3, 0.6, 0.9), gamma: float = 0.1) -> float:
    """Linear warm-up from 0 over ``warmup_steps`` (as :func:`cosine_lr`), then ``base_lr`` times
    ``gamma`` for every milestone passed. Milestones are fractions of ``total_steps`` (BiT's
    0.3, 0.6, 0.9): the lr drops at step ``round(m * total_steps)``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    passed = sum(step >= round(m * total_steps) for m in milestones)
    return base_lr * gamma ** passed


def cosine_wd(step: int, total_steps: int, start: float, end: float) -> float:
    """DINO's weight-decay schedule: half a cosine from ``start`` at step 0 to ``end`` at the
    last step of the run (``total_steps - 1``), no warm-up. DINO rises from 0.04 to 0.4: little
    decay while the features form, more once the teacher is good. (DINO reaches ``end`` one step
    after its last; the difference is a step's worth of a cosine near its flat end.)"""
    return cosine_lr(step, total_steps - 1, start, 0, end)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale`` (1 for groups without one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ---------------------------------------------------------------- layer-wise lr decay
# Layer ids (BEiT/MAE's layer-wise decay, generalised): 0 = everything before the first block
# (patch embedding, stem, class/distillation tokens, position table), 1..L = the blocks in
# forward order numbered consecutively across stages, L + 1 = what follows the last block
# (final norm, head). A down-sampling layer belongs to the first block of the stage it opens: it
# is the first thing that stage computes. A stage-0 "downsample" (CSWin's conv stem) is the stem.
# A wrapper holding the backbone as ``backbone`` (a task, keel's Classifier) is numbered like the
# backbone, and everything else it holds (heads, projectors) at L + 1.
_BLOCK = re.compile(r"^blocks\.(\d+)(?:\.|$)")                            # ViT
_STAGE_BLOCK = re.compile(r"^stages\.(\d+)\.(?:blocks\.)?(\d+)(?:\.|$)")  # Swin, CSWin, hybrid, ResNets
_STAGE_DOWN = re.compile(r"^stages\.(\d+)\.downsample(?:\.|$)")          # Swin, CSWin
_DOWNSAMPLES = re.compile(r"^downsamples\.(\d+)(?:\.|$)")                # keel hybrid
_FIRST = ("patch_embed", "stem", "cls_token", "dist_token", "pos_embed", "mask_token")
_LAST = ("norm", "fc_norm", "head", "head_dist")


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """(the backbone, the name prefix its parameters carry in ``model``)."""
    inner = getattr(model, "backbone", None)
    if isinstance(inner, nn.Module) and not hasattr(model, "blocks") and not hasattr(model, "stages"):
        return inner, "backbone."
    return model, ""


def _stage_offsets(backbone: nn.Module) -> list[int] | None:
    """Number of blocks before each stage, or None for a model without ``stages``."""
    stages = getattr(backbone, "stages", None)
    if stages is None:
        return None
    offsets, n = [], 0
    for stage in stages:
        offsets.append(n)
        n += len(getattr(stage, "blocks", stage))
    offsets.append(n)
    return offsets


def num_layers(model: nn.Module) -> int:
    """L, the number of blocks (layer ids run from 0 to L + 1)."""
    backbone, _ = _unwrap(model)
    offsets = _stage_offsets(backbone)
    if offsets is not None:
        return offsets[-1]
    if hasattr(backbone, "blocks"):
        return len(backbone.blocks)
    raise ValueError(f"{type(backbone).__name__} has neither 'blocks' nor 'stages': no layer ids for it")


def layer_id_of(model: nn.Module, name: str) -> int | None:
    """Layer id of a parameter or module ``name`` of ``model``; None for a container above the
    block level (the model itself, a whole stage, ``blocks``)."""
    backbone, prefix = _unwrap(model)
    L = num_layers(model)
    if prefix:
        if not name.startswith(prefix):
            # the wrapper's own parts (a classifier's head, a method's projector) sit on top
            return L + 1 if name else None
        name = name[len(prefix):]
    offsets = _stage_offsets(backbone)
    if offsets is None:
        m = _BLOCK.match(name)
        if m:
            return int(m.group(1)) + 1
    else:
        m = _STAGE_DOWN.match(name) or _DOWNSAMPLES.match(name)
        if m:
            s = int(m.group(1))
            return 0 if s == 0 else offsets[s] + 1
        m = _STAGE_BLOCK.match(name)
        if m:
            return offsets[int(m.group(1))] + int(m.group(2)) + 1
    top = name.split(".", 1)[0]
    if top in _FIRST:
        return 0
    if top in _LAST:
        return L + 1
    return None


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> layer id (0 .. L + 1) for layer-wise lr decay; see the comment above.
    Raises for a parameter it cannot place, so a new model family cannot slip through unnumbered."""
    ids = {}
    for name, _ in model.named_parameters():
        i = layer_id_of(model, name)
        if i is None:
            raise ValueError(f"no layer id for parameter '{name}' of {type(model).__name__}")
        ids[name] = i
    return ids


def layer_decay_param_groups(model: nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """:func:`param_groups` split further by layer: one group per (layer id, decays or not), each
    with ``lr_scale = decay ** (L + 1 - layer_id)`` (the head's lr is the base lr, each block
    below it ``decay`` times less) and the ``layer_id``. Frozen parameters are left out, as are
    empty groups. Use :func:`apply_lr` to set the lrs."""
    ids, L = layer_ids(model), num_layers(model)
    groups: dict[tuple[int, bool], dict] = {}
    for base in param_groups(model, weight_decay):
        decays = not base["lars_exclude"]
        for name, p in zip(base["names"], base["params"]):
            i = ids[name]
            g = groups.setdefault((i, decays), {
                "params": [], "names": [], "weight_decay": base["weight_decay"],
                "lr_scale": decay ** (L + 1 - i), "layer_id": i})
            g["params"].append(p)
            g["names"].append(name)
    return [groups[k] for k in sorted(groups)]
