"""Supervised training of a backbone with a head: fine-tuning (full, partial, linear), the DeiT
recipe with distillation, BiT's upstream training, multi-label and two-level labels.

An *objective* says what is predicted and how it is scored: :class:`ClassificationTask` (one label
per image), :class:`keel.evaluate.multilabel.MultiLabelTask`, :class:`~keel.evaluate.multilabel.
TwoLevelTask`. It gives the head, the loss and the metrics (``head(num_features)``,
``loss(outputs, targets)``, ``metrics(outputs, targets)``, ``main_metric``).
:class:`SupervisedTask` is the :class:`~keel.tasks.base.Task` the trainer runs for any of them:

* Views: a random resized crop and a horizontal flip per image, drawn for the whole global batch
  from the step's shared generator and applied to this process's rows (so N processes make the
  views of one); with RandAugment or random erasing, per image on the CPU from the process's own
  generator. Then Mixup/CutMix (soft targets) and the teacher's logits, all without gradient.
* Frozen parts (partial and linear modes) are excluded from the optimizer and kept in eval mode:
  their BatchNorm layers keep the statistics of pretraining and their drop-path is off, so a
  frozen layer is the same fixed function at every step. In linear mode the backbone runs without
  autograd and the features go through a BatchNorm without affine parameters (MAE's linear probe).
* The loss is computed in float32 whatever the autocast; with a teacher it is DeiT's
  (:func:`keel.tasks.distill.distillation_loss`) and the parts are logged.
* ``evaluate``: outputs of the whole test split (each process scores a shard; the shards are
  gathered), scored by the objective.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import FinetuneConfig
from keel.data.batches import load_batches
from keel.data.recipes import MixupCutmix, RecipeAugment
from keel.data.views import BatchAugment, ViewConfig, image_sizes
from keel.engine import distributed as D
from keel.engine.optim import layer_decay_param_groups, layer_id_of, num_layers
from keel.evaluate.frozen import make_eval_transform
from keel.evaluate.linear import accuracy_topk
from keel.models.classifier import Classifier, DistilledHead
from keel.models.layers.drop import DropPath
from keel.tasks.base import StepRNG, Task
from keel.tasks.distill import distillation_loss

MODES = ("full", "partial", "linear")


class ClassificationTask:
    """Single-label classification: a linear head, cross-entropy (optionally label-smoothed), top-1
    and top-5 accuracy in percent. ``loss`` takes class indices or, after Mixup/CutMix, (B, C)
    target probabilities; smoothing then applies to the mixed targets, which equals timm's
    smoothing of each one-hot before mixing (the two are linear)."""

    main_metric = "top1"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        self.num_classes = int(num_classes)
        self.label_smoothing = float(label_smoothing)

    def head(self, num_features: int) -> nn.Module:
        # timm's fine-tuning head (reset_classifier: a fresh nn.Linear), weights U(+-1/sqrt(features)),
        # bias zero. Not MAE's near-zero init (std 2e-5): AdamW moves a weight by at most about lr per
        # step, so a head starting at ~0 needs ~1/(sqrt(features) * lr) steps (~180 at 512 features and
        # lr 2.5e-4) before its logits mean anything; meanwhile the loss stays flat and short runs
        # end at chance (benchmarks/finetune_defaults.py).
        head = nn.Linear(num_features, self.num_classes)
        nn.init.zeros_(head.bias)
        return head

    def loss(self, outputs, targets) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        if self.num_classes <= 5:          # top-5 of five classes or fewer is always 100
            return {"top1": accuracy_topk(outputs, targets, (1,))[1]}
        acc = accuracy_topk(outputs, targets, (1, 5))
        return {"top1": acc[1], "top5": acc[5]}


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth after the fact: the DropPath of block i (1..L) gets ``rate * (i-1)/(L-1)``,
    the linear rule keel's models use when built with ``drop_path_rate``."""
    L = num_layers(backbone)
    for name, m in backbone.named_modules():
        if isinstance(m, DropPath):
            i = layer_id_of(backbone, name)
            if i is not None and 1 <= i <= L:
                m.p = rate * (i - 1) / max(1, L - 1)


def frozen_layers(backbone: nn.Module, mode: str, partial_blocks: int) -> set[int]:
    """The layer ids of the backbone that do not train in ``mode``."""
    L = num_layers(backbone)
    if mode == "full":
        return set()
    if mode == "linear":
        return set(range(L + 2))
    if partial_blocks > L:
        raise ValueError(f"task.partial_blocks={partial_blocks} but the backbone has {L} blocks")
    return set(range(L + 1 - partial_blocks))


class SupervisedTask(Task):
    """A backbone with the head of ``objective``, trained as ``cfg`` says (its ``task``, ``aug``,
    ``distill`` and ``model.drop_path_rate``). ``teacher``: a classifier giving class logits
    (required when ``cfg.distill.kind`` is not none); it is not part of the task's state."""

    name = "finetune"

    def __init__(self, backbone: nn.Module, objective, cfg: FinetuneConfig, teacher: nn.Module | None = None):
        super().__init__()
        tc, ac, dc = cfg.task, cfg.aug, cfg.distill
        self.objective, self.cfg = objective, cfg
        self.main_metric = objective.main_metric
        linear = tc.mode == "linear"
        # a distilled DeiT learns from the teacher through its own token and head (not in linear
        # mode, whose feature BatchNorm is for one pooled feature; there one head learns from both)
        two_heads = dc.kind != "none" and getattr(backbone, "dist_token", None) is not None and not linear
        head = DistilledHead(objective.head(backbone.num_features), objective.head(backbone.num_features)) \
            if two_heads else objective.head(backbone.num_features)
        self.model = Classifier(backbone, head, feature_norm=linear, frozen_backbone=linear)
        self.frozen = frozen_layers(backbone, tc.mode, tc.partial_blocks)
        for name, p in backbone.named_parameters():
            p.requires_grad_(layer_id_of(backbone, name) not in self.frozen)
        set_drop_path(backbone, cfg.model.drop_path_rate)
        view = ViewConfig(size=cfg.data.img_size, scale=(ac.scale_min, 1.0), hflip=ac.hflip, jitter_p=0.0,
                          gray_p=0.0, blur_p=0.0)
        self.augment = RecipeAugment(view, ac.randaugment, ac.reprob) if ac.randaugment or ac.reprob > 0 \
            else BatchAugment(view)
        mixing = ac.mixup > 0 or ac.cutmix > 0
        self.mixer = MixupCutmix(objective.num_classes, ac.mixup, ac.cutmix, ac.mix_switch_prob) if mixing else None
        self._teacher = [teacher.eval()] if teacher is not None else []   # a list: not a submodule
        self.eval_transform = make_eval_transform(cfg.data.img_size)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def export_backbone(self) -> nn.Module:
        return self.model.backbone

    def param_groups(self, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        return layer_decay_param_groups(self.model, weight_decay, layer_decay)

    def train_mode(self) -> None:
        self.model.train()
        for name, m in self.model.backbone.named_modules():
            if layer_id_of(self.model.backbone, name) in self.frozen:
                m.eval()

    def _apply(self, fn, recurse=True):
        # the teacher follows the task to its device, though it is not part of its state
        if self._teacher:
            self._teacher[0]._apply(fn)
        return super()._apply(fn, recurse)

    # ---------------------------------------------------------------- a step
    def make_batch(self, batch: dict, rng: StepRNG):
        targets = batch["labels"]
        x = self._views(batch, rng)
        if self.mixer is not None:
            x, targets = self.mixer(x, targets, rng.own)          # soft targets (B, classes)
        teacher_logits = None
        if self.teacher is not None:                              # the teacher sees the mixed batch
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
                teacher_logits = self.teacher(x).float()
        return x, targets, teacher_logits

    def _views(self, batch: dict, rng: StepRNG) -> torch.Tensor:
        images = batch["images"]
        if isinstance(self.augment, BatchAugment):
            # parameters for the whole global batch from the shared stream, this process's rows applied
            sizes = batch.get("sizes")
            if sizes is None:
                params = self.augment.sample_params(batch["global_size"], images.shape[-2], images.shape[-1], rng.shared)
            else:   # images of their own sizes (one canvas): every crop over its own image
                image_sizes(images, sizes)     # checked against this process's canvas
                # the shared stream draws for the global batch, so it needs every process's sizes
                every = D.all_gather_cat(sizes.to(images.device)).cpu()
                params = self.augment.sample_params(batch["global_size"], every[:, 0], every[:, 1], rng.shared)
            if D.world_size() > 1:
                params = {k: v.tensor_split(D.world_size())[D.rank()] for k, v in params.items()}
            return self.augment.apply(images, params)
        return self.augment(images, rng.own, batch.get("sizes"))

    def training_step(self, batch) -> dict:
        x, targets, teacher_logits = batch
        outputs = self.model(x)
        outputs = tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()
        if teacher_logits is not None:
            kind = self.cfg.distill
            return distillation_loss(outputs, teacher_logits, targets, kind.kind, kind.tau, kind.alpha,
                                     base_loss=self.objective.loss)
        return {"loss": self.objective.loss(outputs, targets)}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict(self, data, device: torch.device, autocast, model: nn.Module | None = None,
                batch_size: int = 256, num_workers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, targets) of the whole of ``data`` in its order, float32 outputs on the CPU.
        Under torchrun each process runs a contiguous shard and the shards are gathered, in rank
        order, to every process: each sees what one process would."""
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        idx = torch.arange(len(data)).tensor_split(D.world_size())[D.rank()]
        outputs, targets = [], []
        for batch in load_batches(data, idx.split(batch_size), device, num_workers):
            if len(batch["images"]) == 0:                 # no file of the batch decoded
                continue
            with autocast():
                outputs.append(model(self.eval_transform(batch["images"])).float().cpu())
            targets.append(batch["labels"].cpu())
        outputs, targets = torch.cat(outputs), torch.cat(targets)
        if D.world_size() > 1:       # the collectives move device tensors (NCCL: GPU only)
            outputs, targets = (D.all_gather_cat(t.to(device)).cpu() for t in (outputs, targets))
        model.train(was_training)
        return outputs, targets

    def evaluate(self, data, trainer, model: nn.Module | None = None) -> dict[str, float]:
        batch = max(trainer.cfg.train.batch_size, 256)
        outputs, targets = self.predict(data, trainer.device, trainer.autocast, model, batch,
                                        trainer.cfg.data.num_workers)
        return {k: float(v) for k, v in self.objective.metrics(outputs, targets).items()}
