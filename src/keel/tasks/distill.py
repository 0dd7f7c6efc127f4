"""Knowledge distillation for fine-tuning, as DeiT does it (Touvron et al. 2021, and its code's
``DistillationLoss``), and the teachers it learns from.

The loss (:func:`distillation_loss`), for a student whose output is ``(class logits, distillation
logits)`` (a distilled DeiT: its class token feeds one head, its distillation token another):

* the base loss (the task's: cross-entropy to the labels, or to the Mixup/CutMix soft targets,
  label-smoothed) on the class head only;
* hard: ``CE(distillation logits, teacher logits.argmax(1))``, no smoothing;
* soft: ``KL(softmax(teacher / tau) || softmax(student / tau))`` summed over the batch and the
  classes, times ``tau**2``, divided by ``numel`` = batch x classes (DeiT computes it as
  ``F.kl_div(log_softmax(s / tau), log_softmax(t / tau), reduction="sum", log_target=True)
  * tau * tau / s.numel()``: a per-element mean, so it is 1 / classes of the per-image KL);
* total ``(1 - alpha) * base + alpha * distill``; with DeiT's alpha = 0.5, hard distillation is
  the paper's ``1/2 CE(class head, y) + 1/2 CE(distillation head, teacher's label)``.

A student without a distillation token (a ResNet, a plain ViT) gets both terms on its one head.
The teacher sees the same batch as the student, after Mixup/CutMix, in eval mode and without
gradients; at test time a distilled student predicts the average of its two heads' logits.

Teachers (:func:`keel.hub.resolve_classifier`) are models that output class logits:

* a run directory of ``keel finetune`` (or its ``classifier*.safetensors``, with ``config.yaml``
  beside it): the classifier is rebuilt from the backbone spec in its config.yaml (that spec must
  still resolve: a run directory, ``timm:...`` or ``random:...``) and its weights loaded;
* ``timm:<model>:<file>``: a timm classifier's state dict with its head, converted with
  ``keel.convert.from_timm`` (the number of classes is read from the head);
* ``random:<model>``: a randomly initialised classifier (seeded): for tests and plumbing only.

A pretraining run directory (a head-less backbone) is not a teacher: fine-tune it first. The
teacher is fed the student's input (keel's normalisation, mean 0.5 and std 0.5, at the student's
image size; ViTs resample their position table, convolutional models take any size): a timm
classifier trained with other statistics sees slightly shifted inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["distillation_loss", "DISTILL_KINDS"]

DISTILL_KINDS = ("none", "hard", "soft")


def distillation_loss(student_out, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                      kind: str = "hard", tau: float = 1.0, alpha: float = 0.5,
                      base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """DeiT's distillation loss (see the module docstring). ``student_out`` is the logits, or a
    ``(class logits, distillation logits)`` pair; ``base_loss(logits, targets)`` defaults to
    cross-entropy. Returns ``{"loss", "base_loss", "distill_loss"}`` (``distill_loss`` absent
    for ``kind="none"``, where ``loss`` is the base loss)."""
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distillation kind must be one of {' | '.join(DISTILL_KINDS)}, got {kind!r}")
    if isinstance(student_out, (tuple, list)):
        cls_out, dist_out = student_out
    else:
        cls_out = dist_out = student_out
    base = (base_loss or F.cross_entropy)(cls_out, targets)
    if kind == "none":
        return {"loss": base, "base_loss": base}
    if teacher_logits is None:
        raise ValueError(f"{kind} distillation needs the teacher's logits")
    teacher_logits = teacher_logits.detach().float()
    if teacher_logits.shape != dist_out.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(dist_out.shape)}: the teacher must predict the same classes")
    if kind == "hard":
        distill = F.cross_entropy(dist_out, teacher_logits.argmax(dim=1))
    else:
        distill = F.kl_div(F.log_softmax(dist_out / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                           reduction="sum", log_target=True) * (tau * tau) / dist_out.numel()
    return {"loss": (1 - alpha) * base + alpha * distill, "base_loss": base, "distill_loss": distill}
