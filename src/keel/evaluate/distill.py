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

Teachers (:func:`load_teacher`) are models that output class logits:

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

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["distillation_loss", "load_teacher", "load_classifier", "DISTILL_KINDS"]

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


def _classifier_files(spec: str) -> tuple[Path, Path] | None:
    """(weights, config.yaml) when ``spec`` is a keel finetune run or one of its classifier files."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "classifier.safetensors").is_file():
        return p / "classifier.safetensors", p / "config.yaml"
    if p.is_file() and p.suffix == ".safetensors" and p.name.startswith("classifier"):
        return p, p.with_name("config.yaml")
    return None


def load_classifier(weights: str | Path, config: str | Path | None = None,
                    backbone: nn.Module | None = None) -> nn.Module:
    """The :class:`~keel.evaluate.finetune.Classifier` a ``keel finetune`` run saved in
    ``weights`` (``classifier.safetensors``, ``classifier_best`` or ``classifier_ema``), rebuilt
    from the run's ``config.yaml`` (default: beside the weights): its backbone spec gives the
    architecture (or pass ``backbone``, a module of the same architecture, e.g. for runs made by
    calling ``finetune()`` with a module), the keys give the head (one linear layer, or DeiT's
    pair ``head.cls`` / ``head.dist``) and linear mode's feature BatchNorm."""
    from safetensors.torch import load_file

    from keel.config import load_config
    from keel.evaluate.finetune import Classifier, DistilledHead, FinetuneConfig, load_for_finetune
    weights = Path(weights)
    config = Path(config) if config is not None else weights.with_name("config.yaml")
    if not config.is_file():
        raise FileNotFoundError(f"'{weights}' has no config.yaml beside it: the classifier's architecture is unknown")
    cfg = load_config(config, cls=FinetuneConfig)
    sd = load_file(str(weights), device="cpu")
    if backbone is None:
        if not cfg.backbone:
            raise ValueError(f"'{config}' names no backbone (the run came from finetune() with a module): "
                             "pass a backbone of its architecture to load_classifier(..., backbone=...), "
                             "and the classifier to finetune(..., teacher=...)")
        try:
            backbone = load_for_finetune(cfg.backbone, cfg.img_size, seed=cfg.seed)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"cannot rebuild the backbone of '{weights}' from its config's "
                             f"backbone={cfg.backbone!r}: {e}") from None

    def linear(prefix: str) -> nn.Linear:
        w = sd[prefix + ".weight"]
        return nn.Linear(w.shape[1], w.shape[0], bias=prefix + ".bias" in sd)

    if "head.cls.weight" in sd:
        head = DistilledHead(linear("head.cls"), linear("head.dist"))
    elif "head.weight" in sd and sd["head.weight"].dim() == 2:
        head = linear("head")
    else:
        raise ValueError(f"'{weights}' holds no linear classifier head (head.weight)")
    model = Classifier(backbone, head, feature_norm="feature_norm.running_mean" in sd)
    model.load_state_dict(sd)
    return model


def load_teacher(spec: str, num_classes: int, img_size: int, seed: int = 0) -> nn.Module:
    """A frozen teacher in eval mode whose ``forward`` gives (B, ``num_classes``) logits, from a
    keel finetune run, ``timm:<model>:<file>`` (a timm classifier with its head) or
    ``random:<model>`` (see the module docstring). ``img_size``: the size timm and random teachers
    are built at (a finetune run keeps its own)."""
    from keel.evaluate.finetune import _fit_pos_embed, _keel_name, load_for_finetune, read_timm_spec
    from keel.models.registry import create_model
    files = _classifier_files(spec)
    if files is not None:
        model = load_classifier(*files)
    elif spec.startswith("random:"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(_keel_name(spec[len("random:"):]), num_classes=num_classes, img_size=img_size)
    elif spec.startswith("timm:"):
        name, sd = read_timm_spec(spec)
        if "head.weight" not in sd:
            raise ValueError(f"'{spec}' has no classifier head: a teacher must output class logits")
        with torch.random.fork_rng(devices=[]):
            model = create_model(name, num_classes=sd["head.weight"].shape[0], img_size=img_size)
        _fit_pos_embed(model, sd)
        model.load_state_dict(sd)
    else:
        model = load_for_finetune(spec, img_size, seed=seed)   # a pretraining run: no head
        if not isinstance(getattr(model, "head", None), nn.Linear):
            raise ValueError(f"'{spec}' is a backbone without a classifier head: a teacher must output "
                             "class logits; fine-tune it first (keel finetune) and give that run directory")
    head = model.head.cls if hasattr(model.head, "cls") else model.head
    if head.out_features != num_classes:
        raise ValueError(f"teacher '{spec}' predicts {head.out_features} classes, the data has {num_classes}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
