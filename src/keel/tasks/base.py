"""The Task interface: what one kind of training does at each step, for the one trainer.

The trainer (:mod:`keel.engine.trainer`) calls, per step::

    task.on_step_start(step, steps_per_epoch, total_steps)   # schedules (temperatures, ...)
    batch = task.make_batch(batch, rng)                        # no grad, outside autocast
    out = model(batch)                                         # task.training_step, under autocast,
                                                               # through DDP / torch.compile
    out["loss"].backward()
    task.before_optimizer_step(step, steps_per_epoch)          # e.g. freeze SwAV's prototypes
    optimizer.step()
    task.on_step_end(step, total_steps)                        # EMA teachers

``batch`` comes in as ``{"images": uint8 (B, 3, H, W) on the device, "labels": ... when the data
has them}``; ``rng`` is a :class:`StepRNG`. Every hook gets the global step, so a resumed run calls
them exactly as an unbroken one. State a task keeps across steps (queues, centres, teachers) lives
in buffers or submodules: it is saved in checkpoints and restored on resume. Extra entries of
``out`` (floats or 0-d tensors) are logged next to the loss.

``forward`` is ``training_step`` so that DDP and ``torch.compile`` wrap the task as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from keel.engine.optim import layer_decay_param_groups, param_groups


@dataclass
class StepRNG:
    """The random streams of one step. ``own`` is this process's (seeded by seed, step and rank):
    draws for its own images. ``shared`` is the same on every process (seeded by seed and step):
    draws made for the whole global batch, of which each process applies its rows, so that N
    processes make exactly the views one process makes."""
    own: torch.Generator
    shared: torch.Generator


class Task(nn.Module):
    name = "task"
    main_metric: str | None = None      # the key of evaluate()'s metrics that picks the best epoch

    def make_batch(self, batch: dict, rng: StepRNG):
        raise NotImplementedError  # abstract: every task prepares its own batch

    def training_step(self, batch) -> dict:
        raise NotImplementedError  # abstract: every task defines its loss

    def forward(self, batch) -> dict:
        return self.training_step(batch)

    def param_groups(self, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """Optimizer groups of the parameters that train: no weight decay on norms, biases and
        tokens; with ``layer_decay`` < 1 one group per backbone layer with its ``lr_scale``
        (parameters outside the backbone, the heads, at the top layer's full lr)."""
        if layer_decay < 1.0:
            return layer_decay_param_groups(self, weight_decay, layer_decay)
        return param_groups(self, weight_decay)

    def train_mode(self) -> None:
        """Set train/eval mode for a training step (a task with frozen parts keeps them in eval)."""
        self.train()

    def export_backbone(self) -> nn.Module:
        """The network that is exported and monitored: the trained backbone, or for methods whose
        teacher is the better model (DINO), the teacher's."""
        return self.backbone

    def on_step_start(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        """Hook for per-step schedules, called before the batch is made; nothing by default."""

    def before_optimizer_step(self, step: int, steps_per_epoch: int) -> None:
        """Hook between backward and the optimizer step (gradients exist); nothing by default."""

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Hook for EMA teachers, after the optimizer step; nothing by default."""
