"""DINO (Caron et al. 2021): self-distillation with no labels.

A student (backbone + DINO head) learns to match, on every crop, the sharpened output of a
teacher that is an EMA of the student and sees only the global crops. Collapse is avoided by
centring the teacher's outputs (a running mean kept in a buffer, all-reduced over processes)
and sharpening them with a low temperature; no negatives, no predictor.

Choices that are not obvious from the paper:

- The head's last layer is weight-normalized with its norm fixed to 1 (the official
  ``weight_norm`` with ``weight_g = 1`` frozen). It is written out explicitly here: one
  parameter ``weight`` (the direction, ``weight_v`` in the official code) whose rows are
  normalized in forward. Same function and same gradients, no parametrization machinery in the
  state dict, and nothing in ``torch.nn.utils`` that changes between versions.
- The teacher temperature warms up linearly per *step* (from ``warmup_teacher_temp`` at step 0
  to ``teacher_temp`` at epoch ``warmup_teacher_temp_epochs``), where the official code steps
  once per epoch along ``linspace(warmup, final, warmup_epochs)``.
- The teacher has no stochastic depth (its DropPath rates are set to 0), as in the official
  code, where the teacher is built without ``drop_path_rate``. BatchNorm layers in the teacher
  (ResNet backbones) use batch statistics in training mode, also as there.
- Schedules that forward reads (teacher temperature) are 0-d buffers filled by the hooks, not
  Python floats: a compiled forward would otherwise recompile whenever their value changes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import RunConfig
from keel.engine.distributed import all_reduce_mean
from keel.tasks.ssl.augment import MultiCrop
from keel.tasks.ssl.base import Method, register_method
from keel.tasks.ssl.momentum import cosine_momentum, ema_update, momentum_copy
from keel.models.layers.drop import DropPath
from keel.models.layers.init import init_linear_trunc_normal


# ---------------------------------------------------------------- the loss
def sharpen(teacher_out: torch.Tensor, center: torch.Tensor, temperature) -> torch.Tensor:
    """The teacher's targets: softmax((t - center) / temperature), in float32."""
    return F.softmax((teacher_out.float() - center.float()) / temperature, dim=-1)


def cross_view_entropy(targets: torch.Tensor, student_out: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean over pairs (teacher view i, student view v), v != i, and over the batch, of
    -sum_k q_i[k] log softmax(s_v / student_temp)[k].

    ``targets`` (n_t, B, K) are probabilities; ``student_out`` (n_s, B, K) are logits whose first
    n_t views are the same crops as the teacher's (the pairs with the same crop are skipped).
    """
    n_t, n_s = targets.shape[0], student_out.shape[0]
    n_terms = n_t * n_s - min(n_t, n_s)
    if n_terms == 0:
        raise ValueError(f"DINO needs two views or more: {n_t} teacher and {n_s} student views leave no pair")
    # autocast would run the einsum's batched matmul in bf16/fp16: the loss stays in float32
    with torch.autocast(student_out.device.type, enabled=False):
        log_p = F.log_softmax(student_out.float() / student_temp, dim=-1)
        ce = -torch.einsum("tbk,sbk->ts", targets.float(), log_p) / targets.shape[1]   # (n_t, n_s)
        same = torch.eye(n_t, n_s, dtype=torch.bool, device=ce.device)
        return ce.masked_fill(same, 0.0).sum() / n_terms


def dino_loss(teacher_out: torch.Tensor, student_out: torch.Tensor, center: torch.Tensor,
              teacher_temp, student_temp: float = 0.1) -> torch.Tensor:
    """DINO's loss from raw head outputs: teacher (n_t, B, K), student (n_s, B, K), center (1, K).

    The mean over processes of this process's loss equals the loss of one process on the whole
    batch (it is a per-sample mean), so no gather is needed.
    """
    return cross_view_entropy(sharpen(teacher_out, center, teacher_temp), student_out, student_temp)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of the teacher outputs over views and
    the global batch (every process holds the same number of samples, so the mean of the
    per-process means is the global mean)."""
    flat = teacher_out.detach().float().reshape(-1, teacher_out.shape[-1])
    batch_center = all_reduce_mean(flat.mean(0, keepdim=True))
    center.mul_(momentum).add_(batch_center, alpha=1.0 - momentum)


def teacher_temperature(step: int, steps_per_epoch: int, warmup_temp: float, final_temp: float,
                        warmup_epochs: float) -> float:
    """Linear from ``warmup_temp`` at step 0 to ``final_temp`` after ``warmup_epochs`` epochs, then constant."""
    warmup_steps = warmup_epochs * steps_per_epoch
    if warmup_steps <= 0 or step >= warmup_steps:
        return final_temp
    return warmup_temp + (final_temp - warmup_temp) * step / warmup_steps


# ---------------------------------------------------------------- the head
class NormalizedLinear(nn.Module):
    """Linear without bias whose weight rows have norm 1: weight_norm with the norm frozen at 1."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck, GELU) -> L2 normalize -> NormalizedLinear(out_dim)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, use_bn: bool = False):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers += ([nn.BatchNorm1d(b)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        init_linear_trunc_normal(self.mlp, std=0.02)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


# ---------------------------------------------------------------- the method
def _same_size_runs(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of equal resolution concatenated: one backbone call per resolution."""
    runs: list[list[torch.Tensor]] = []
    for v in views:
        if runs and runs[-1][0].shape[-2:] == v.shape[-2:]:
            runs[-1].append(v)
        else:
            runs.append([v])
    return [torch.cat(r) for r in runs]


@register_method
class DINO(Method):
    name = "dino"
    defaults = dict(temperature=0.1, momentum=0.996, out_dim=65536, proj_hidden_dim=2048, proj_dim=256)

    def __init__(self, backbone: nn.Module, cfg: RunConfig):
        super().__init__(backbone, cfg)
        m = cfg.method
        self.student_temp = self.opt("temperature")
        self.base_momentum = self.opt("momentum")
        self.center_momentum = m.center_momentum
        self.freeze_last_layer_epochs = m.freeze_prototypes_epochs
        self.out_dim = self.opt("out_dim")
        self.head = DINOHead(backbone.num_features, self.out_dim, self.opt("proj_hidden_dim"),
                             self.opt("proj_dim"))
        self.teacher = nn.ModuleDict({"backbone": momentum_copy(backbone), "head": momentum_copy(self.head)})
        for mod in self.teacher.modules():
            if isinstance(mod, DropPath):
                mod.p = 0.0
        self.crops = MultiCrop(cfg, default_local_crops=6)
        self.register_buffer("center", torch.zeros(1, self.out_dim))
        # schedules, recomputed from the step by on_step_start (so not saved)
        self.register_buffer("teacher_temp", torch.tensor(float(m.warmup_teacher_temp)), persistent=False)
        self.register_buffer("momentum", torch.tensor(float(self.base_momentum)), persistent=False)

    def make_views(self, images, generator, sizes=None):
        return self.crops(images, generator, sizes)

    def export_backbone(self) -> nn.Module:
        # DINO's paper evaluates (and releases) the teacher: the EMA of the student is the better model.
        return self.teacher["backbone"]

    def on_step_start(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        m = self.cfg.method
        self.teacher_temp.fill_(teacher_temperature(step, steps_per_epoch, m.warmup_teacher_temp, m.teacher_temp,
                                                    m.warmup_teacher_temp_epochs))
        self.momentum.fill_(cosine_momentum(step, total_steps, self.base_momentum))

    def training_step(self, views) -> dict:
        n_global, batch = self.crops.n_global, views[0].shape[0]
        student = self.head(torch.cat([self.backbone.embed(x) for x in _same_size_runs(views)]))
        with torch.no_grad():
            teacher = self.teacher["head"](torch.cat([self.teacher["backbone"].embed(x)
                                                      for x in _same_size_runs(views[:n_global])]))
            targets = sharpen(teacher.view(n_global, batch, -1), self.center, self.teacher_temp)
            entropy = -(targets * torch.log(targets.clamp_min(1e-30))).sum(-1).mean()
        loss = cross_view_entropy(targets, student.view(len(views), batch, -1), self.student_temp)
        update_center(self.center, teacher, self.center_momentum)
        return {"loss": loss, "teacher_temp": self.teacher_temp.detach().clone(),
                "momentum": self.momentum.detach().clone(), "teacher_entropy": entropy}

    def before_optimizer_step(self, step: int, steps_per_epoch: int) -> None:
        # The official recipe keeps the last layer fixed during the first epoch (its authors
        # report this steadies the start of training). Gradients are already all-reduced here;
        # a None grad also spares the layer the optimizer's weight decay.
        if step < self.freeze_last_layer_epochs * steps_per_epoch:
            self.head.last_layer.weight.grad = None

    def on_step_end(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(step, total_steps, self.base_momentum)
        ema_update(self.teacher["backbone"], self.backbone, m)
        ema_update(self.teacher["head"], self.head, m)
