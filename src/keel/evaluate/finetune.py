"""Fine-tuning a backbone on a labeled dataset: every layer (full), the last k blocks (partial) or
the head alone (linear). The loop is as plain as MAE's main_finetune: read it top to bottom.

* Views: a random resized crop (area 0.35-1) and a horizontal flip per image, drawn for the whole
  batch on its device (keel's BatchAugment with the colour operations off); evaluation resizes and
  normalises (``eval_transform``), as the frozen-feature protocols do.
* Optimizer: AdamW or SGD on the parameters that train, norms and biases without weight decay,
  optionally with layer-wise lr decay (BEiT/MAE): the head gets the base lr and each block below
  it ``layer_decay`` times less. The lr is given for a batch of 256 and scaled linearly.
* Schedule, per step: linear warm-up, then cosine to zero or steps of x0.1 at fractions of training.
* Frozen parts (partial and linear modes) are put in eval mode as well as excluded from the
  optimizer: their BatchNorm layers normalise with the running statistics of pretraining and keep
  them, and their drop-path is off, so a frozen layer is the same fixed function at every step
  (the tests check its weights and buffers come out bit-identical). In linear mode the backbone's
  forward runs without autograd, and the features go through a BatchNorm without affine
  parameters before the head (MAE's linear probe): the head then sees standardised features,
  so one lr suits every backbone; at inference it is a fixed affine map, still a linear classifier.
* Each epoch (``eval_every``) ends with an evaluation on the test split. "best" in result.json is
  the best epoch by the task's main metric, picked on the test split itself: an optimistic number.
  "final" (the last epoch) is the honest one when there is no separate validation split.

Supervised recipe (DeiT's; all off by default, ``recipe="deit"`` turns them on, see
:func:`apply_recipe`): RandAugment and random erasing in the views, Mixup/CutMix on the batch
(soft targets, label smoothing applied by the loss), repeated augmentation (the same image several
times per batch, each copy with its own views), a model EMA evaluated beside the model, and
knowledge distillation from a teacher (:mod:`keel.evaluate.distill`). The augmentations are
torchvision's (:mod:`keel.data.recipes`): RandAugment runs per image on the CPU, so GPU batches
make a round trip there. A distilled DeiT student gets a second head on its distillation token
(:class:`DistilledHead`); in linear mode, or without a distillation token, the student's one head
learns from both the labels and the teacher. Kept from keel's fine-tuning rather than DeiT's: the
crop (area 0.35-1, DeiT 0.08-1), the warm-up from 0 and the cosine to 0 (DeiT: from 1e-6, to 1e-5).

Randomness: the head's initialisation and drop-path come from ``torch.manual_seed(seed)``, the data
order and the views from one ``torch.Generator`` seeded with ``seed``; the same seed (on the same
device, with the same number of threads) gives the same run.

Several processes (``torchrun --nproc_per_node N -m keel finetune ...``; one process is the same
run as without torchrun, to the bit). ``batch_size`` is the global batch: every rank draws the
same index batches and takes its contiguous share (near-equal parts), the model is wrapped in
DistributedDataParallel, and each rank's mean loss is weighted by its share of the batch, so the
averaged gradient is the whole batch's even when the shares differ by an image. Each rank
evaluates a shard of the test split and the outputs are gathered, so every rank scores the whole
split as one process would; the EMA is kept on every rank (of identical weights, so identical);
a teacher sees the rank's share. Only rank 0 prints and writes ``run_dir``; all ranks return the
same result. What N processes reproduce of one process's run, up to float round-off: with plain
views (crop + flip, drawn for the whole batch from the shared generator, each rank applying its
rows) and no BatchNorm training on CPU, the whole run -- weights, losses, metrics (a test checks
2 processes against 1). What they do not: BatchNorm in train mode normalises with the whole
batch on GPU (SyncBatchNorm) but with each rank's share on CPU (gloo has no SyncBatchNorm; the
running statistics are made rank 0's after each step); RandAugment, random erasing,
Mixup/CutMix (pairs and lambda within the share) and drop-path draw from per-rank streams,
random alike but not the same draws. Undecodable images of a folder are replaced by the share's
decodable ones (as pretraining does) instead of dropped, so the ranks keep stepping together.

Resuming (``finetune(..., resume=True)``, ``run_finetune(None, run_dir, resume=True)``, ``keel
finetune --resume RUN_DIR``): at the end of every epoch, after its evaluation, rank 0 writes
``checkpoints/last.pt`` atomically: the model (backbone, feature norm, head), the optimizer, the
EMA, the epoch and step, the data/view generator, every rank's torch RNG (drop-path) and own
generator, the best epochs and the metric history. A resumed run loads it on every rank (with
``weights_only``: no code runs), rewrites metrics.jsonl from the history and goes on from the next
epoch: on the same device and threads it ends with the weights, metrics and files of an unbroken
run (only ``time_s``/``seconds`` differ). A finished run (result.json written) returns its result.

Artifacts in ``run_dir``: ``config.yaml`` (the FinetuneConfig), ``metrics.jsonl`` (one line per
epoch), ``checkpoints/last.pt`` (see above), ``classifier.safetensors`` (backbone + head after the
last epoch, keys ``backbone.*`` and ``head.*``), ``classifier_best.safetensors`` (the same at
the best epoch), ``result.json`` and ``curves.png``; with ``model_ema`` also
``classifier_ema.safetensors`` (the EMA after the last epoch). config.yaml holds the values used,
a recipe's filled in.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import ConfigError, load_config, save_config, to_dict
from keel.data.recipes import MixupCutmix, RecipeAugment, parse_randaugment, repeated_batches
from keel.data.sources import collate_skip
from keel.data.views import BatchAugment, ViewConfig
from keel.engine.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from keel.engine import distributed as D
from keel.engine.optim import apply_lr, cosine_lr, layer_decay_param_groups, layer_id_of, num_layers, step_lr
from keel.evaluate.distill import DISTILL_KINDS, distillation_loss, load_teacher
from keel.evaluate.frozen import make_eval_transform
from keel.evaluate.linear import accuracy_topk
from keel.evaluate.lr_search import BIT_LR_GRID, SEARCH_DIR, search_config_path, search_lr
from keel.models.layers.drop import DropPath
from keel.models.layers.init import trunc_normal_
from keel.models.registry import family_of

__all__ = ["FinetuneConfig", "Task", "ClassificationTask", "Classifier", "DistilledHead", "finetune",
           "run_finetune", "labeled_data", "load_for_finetune", "set_drop_path", "apply_recipe", "update_ema", "RECIPES",
           "DEFAULT_LR", "DEFAULT_WEIGHT_DECAY"]

# Per optimizer when the config leaves them unset. AdamW: MAE's fine-tuning (base lr 5e-4 per 256,
# weight decay 0.05). SGD: momentum 0.9 and no weight decay as BiT fine-tunes, lr 0.01 per 256.
DEFAULT_LR = {"adamw": 5e-4, "sgd": 0.01}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 0.0}

MODES = ("full", "partial", "linear")


@dataclass
class FinetuneConfig:
    backbone: str = ""              # what to fine-tune, for run_finetune: see load_for_finetune
    source: str = "digits"          # labeled data: built-in name, image folder or labels CSV (labeled_data)
    test_source: str = ""           # a CSV source's test CSV; "" = every 5th row of source held out
    multilabel_loss: str = "bce"    # multi-label CSV: bce | asl (asymmetric loss)
    threshold: float = 0.5          # multi-label CSV: sigmoid threshold of the F1 scores
    img_size: int = 32              # images are decoded at and views cropped to this side
    mode: str = "full"              # full | partial (last partial_blocks blocks + head) | linear (head)
    partial_blocks: int = 2         # partial: blocks that train, counted from the last (0: final norm + head)
    epochs: int = 50
    batch_size: int = 128           # an epoch is ceil(n / batch_size) near-equal batches
    optimizer: str = "adamw"        # adamw | sgd
    lr: float | None = None         # base lr for a batch of 256, scaled linearly (None: adamw 5e-4, sgd 0.01)
    lr_search: list[float] = field(default_factory=list)  # lrs to try on held-out training images first
                                    # (keel.evaluate.lr_search); the best one trains; [] = off
    lr_search_holdout: float = 0.2  # lr_search: fraction of each class's training images held out
    weight_decay: float | None = None  # None: adamw 0.05, sgd 0; never on norms, biases, tokens
    momentum: float = 0.9           # sgd only
    schedule: str = "cosine"        # cosine (to zero) | step (x0.1 at each milestone)
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])  # step: fractions of training
    warmup_epochs: float = 5.0      # linear warm-up (capped at the whole run)
    layer_decay: float = 1.0        # layer-wise lr decay; 1.0 = off (MAE: 0.65-0.75 for ViTs)
    label_smoothing: float = 0.1
    drop_path_rate: float = 0.1     # stochastic depth of the last block, linear from 0 at the first
    clip_grad: float = 0.0          # max gradient norm; 0 = no clipping
    eval_every: int = 1             # epochs between test evaluations; 0 = the last epoch only
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    precision: str = "auto"         # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    num_workers: int = 2            # decoding workers for image folders
    out_dir: str = "runs"           # run_finetune's default run directory lives here
    # supervised recipe (all off by default) and knowledge distillation
    recipe: str = ""                # "" | deit: fills the DeiT values of the keys left at their defaults
                                    # | bit-upstream: BiT's from-scratch training (SGD, wd 1e-4, steps)
                                    # | bit: BiT-HyperRule picks schedule, lr, MixUp, resolution from the data
    recipe_max_side: int = 0        # bit: cap the HyperRule's resolution (128 or 480 px) for small machines; 0 = none
    randaugment: str = ""           # timm-style spec, e.g. rand-m9-mstd0.5-inc1 ("": off)
    mixup: float = 0.0              # Mixup's Beta alpha (0: off)
    cutmix: float = 0.0             # CutMix's Beta alpha (0: off)
    mix_switch_prob: float = 0.5    # both on: CutMix with this probability per batch, else Mixup
    reprob: float = 0.0             # random erasing probability per image
    repeated_aug: int = 1           # copies of each image per batch, each with its own views (DeiT: 3)
    model_ema: float = 0.0          # EMA decay per step (0: off); the EMA is evaluated too (ema_* metrics)
    teacher: str = ""               # classifier to distill from: keel finetune run, timm:<model>:<file>, random:<model>
    distill: str = "none"           # none | hard (teacher's argmax) | soft (KL at distill_tau)
    distill_tau: float = 1.0        # soft distillation temperature
    distill_alpha: float = 0.5      # loss = (1 - alpha) * base + alpha * distillation


# BiT upstream (Kolesnikov et al. 2020): training a GN+WS ResNet-v2 from scratch on the big labeled
# set, SGD momentum 0.9, lr 0.03 per 256 (keel's unit), weight decay 1e-4, x0.1 at 30, 60 and 80 of
# 90 epochs; no label smoothing, no drop-path. Left to the user: the epochs (BiT: 90) and the
# warm-up (keel's 5 epochs; BiT warms up for 5,000 steps of 4,096 images).
# DeiT (Touvron et al. 2021, its main.py): AdamW, lr 5e-4 per 512 images (keel's lr is per 256:
# 2.5e-4), weight decay 0.05, cosine, 5 warm-up epochs, label smoothing 0.1, RandAugment m9
# mstd0.5 (increasing ops), Mixup 0.8, CutMix 1.0 (switch 0.5), random erasing 0.25, drop path
# 0.1, repeated augmentation x3. Left to the user: the epochs (DeiT: 300), the model EMA (off).
RECIPES: dict[str, dict] = {
    "bit-upstream": {"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "momentum": 0.9, "schedule": "step",
                     "milestones": [30 / 90, 60 / 90, 80 / 90], "label_smoothing": 0.0, "drop_path_rate": 0.0},
    "deit": {"optimizer": "adamw", "lr": 2.5e-4, "weight_decay": 0.05, "schedule": "cosine",
             "warmup_epochs": 5.0, "label_smoothing": 0.1, "randaugment": "rand-m9-mstd0.5-inc1",
             "mixup": 0.8, "cutmix": 1.0, "mix_switch_prob": 0.5, "reprob": 0.25, "drop_path_rate": 0.1,
             "repeated_aug": 3},
}


def apply_recipe(cfg: FinetuneConfig, verbose: bool = True) -> FinetuneConfig:
    """``cfg`` with its recipe's values (:data:`RECIPES`) in every key the user left at its
    default; a key set to anything else is kept, and so are ``lr`` and ``weight_decay`` when the
    optimizer is not the recipe's (the recipe's values are for its optimizer). Returns a new
    config (``cfg`` itself is not changed); applying it twice changes nothing more. With
    ``verbose`` it prints what it set and what it kept."""
    if not cfg.recipe:
        return cfg
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"recipe must be one of '' | {' | '.join(RECIPES)}, got {cfg.recipe!r}")
    recipe, defaults = RECIPES[cfg.recipe], FinetuneConfig()
    # the optimizer the run will use: the user's when set, else the recipe's
    optimizer = cfg.optimizer if cfg.optimizer != defaults.optimizer else recipe.get("optimizer", cfg.optimizer)
    other_optimizer = optimizer != recipe.get("optimizer", optimizer)
    changes, same, kept = {}, [], []
    for key, value in recipe.items():
        current = getattr(cfg, key)
        if current == value:
            same.append(f"{key}={value!r}")
        elif current == getattr(defaults, key) and not (other_optimizer and key in ("lr", "weight_decay")):
            changes[key] = value
        else:
            kept.append(f"{key}={current!r}")
    if verbose:
        lines = [f"recipe {cfg.recipe}: set " + (", ".join(f"{k}={v!r}" for k, v in changes.items()) or "nothing")]
        if same:
            lines.append("  already the recipe's: " + ", ".join(same))
        if kept:
            lines.append("  kept (set by you): " + ", ".join(kept))
        print("\n".join(lines))
    return replace(cfg, **changes)


class Task(Protocol):
    """What is predicted and how it is scored; the backbone's pooled features go through ``head``.
    ``metrics`` sees the whole test split at once (outputs concatenated along dim 0, float32 on the
    CPU) and ``main_metric`` (higher is better) picks the best epoch."""

    def head(self, num_features: int) -> nn.Module: ...
    def loss(self, outputs, targets) -> torch.Tensor: ...          # outputs = head(features)
    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]: ...
    main_metric: str                                               # key of metrics used for "best"


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
        head = nn.Linear(num_features, self.num_classes)
        # MAE's head init: nearly zero, so the first steps do not send random gradients into the backbone
        trunc_normal_(head.weight, std=2e-5)
        nn.init.zeros_(head.bias)
        return head

    def loss(self, outputs, targets) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        acc = accuracy_topk(outputs, targets, (1, 5))
        return {"top1": acc[1], "top5": acc[5]}


class DistilledHead(nn.Module):
    """DeiT's two classifiers for a backbone with a distillation token: ``cls`` reads the class
    token, ``dist`` the distillation token. Train mode: ``(class logits, distillation logits)``
    (the first learns from the labels, the second from the teacher); eval mode: their average."""

    def __init__(self, cls: nn.Module, dist: nn.Module):
        super().__init__()
        self.cls = cls
        self.dist = dist

    def forward(self, cls_features: torch.Tensor, dist_features: torch.Tensor):
        a, b = self.cls(cls_features), self.dist(dist_features)
        return (a, b) if self.training else (a + b) / 2


class Classifier(nn.Module):
    """``head(feature_norm(backbone.embed(x)))``. ``feature_norm`` is a BatchNorm without affine
    parameters in linear mode (see the module docstring), else the identity. With
    ``frozen_backbone`` the backbone runs without autograd. A :class:`DistilledHead` reads the
    backbone's class and distillation tokens (``forward_tokens``) instead of ``embed``."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature_norm: bool = False,
                 frozen_backbone: bool = False):
        super().__init__()
        if isinstance(head, DistilledHead) and (feature_norm or getattr(backbone, "dist_token", None) is None):
            raise ValueError("a DistilledHead needs a backbone with a distillation token, without feature_norm")
        self.backbone = backbone
        self.feature_norm = (nn.BatchNorm1d(backbone.num_features, affine=False, eps=1e-6) if feature_norm
                             else nn.Identity())
        self.head = head
        self.frozen_backbone = frozen_backbone

    def forward(self, x: torch.Tensor):
        if isinstance(self.head, DistilledHead):
            with torch.no_grad() if self.frozen_backbone else contextlib.nullcontext():
                tokens = self.backbone.forward_tokens(x)
            return self.head(tokens[:, 0], tokens[:, 1])
        with torch.no_grad() if self.frozen_backbone else contextlib.nullcontext():
            features = self.backbone.embed(x)
        return self.head(self.feature_norm(features))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """One step of a model EMA (timm's ModelEma, DeiT's ``--model-ema``): every floating-point
    entry of the state dict, parameters and buffers (BatchNorm statistics) alike, becomes
    ``decay * ema + (1 - decay) * model``; integer buffers (BatchNorm's step count) are copied.
    Started from a copy of the model before the first step, after k steps it is
    ``decay**k * w0 + (1 - decay) * sum_i decay**(k - i) * w_i``."""
    own = model.state_dict()
    for key, e in ema.state_dict().items():
        if e.is_floating_point():
            e.lerp_(own[key].to(e.dtype), 1.0 - decay)
        else:
            e.copy_(own[key])


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth after the fact: the DropPath of block i (1..L) gets ``rate * (i-1)/(L-1)``,
    the linear rule keel's models use when built with ``drop_path_rate``."""
    L = num_layers(backbone)
    for name, m in backbone.named_modules():
        if isinstance(m, DropPath):
            i = layer_id_of(backbone, name)
            if i is not None and 1 <= i <= L:
                m.p = rate * (i - 1) / max(1, L - 1)


# ---------------------------------------------------------------------------------- helpers
def _check(cfg: FinetuneConfig) -> None:
    choices = {"mode": MODES, "optimizer": ("adamw", "sgd"), "schedule": ("cosine", "step"),
               "precision": ("auto", "bf16", "fp32")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {' | '.join(allowed)}, got {getattr(cfg, key)!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("epochs and batch_size must be >= 1")
    if cfg.partial_blocks < 0 or cfg.eval_every < 0 or cfg.warmup_epochs < 0:
        raise ConfigError("partial_blocks, eval_every and warmup_epochs must be >= 0")
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise ConfigError(f"layer_decay must be in (0, 1], got {cfg.layer_decay}")
    if any(not 0.0 <= m <= 1.0 for m in cfg.milestones):
        raise ConfigError(f"milestones are fractions of training in [0, 1], got {cfg.milestones}")
    if cfg.recipe and cfg.recipe not in RECIPES and cfg.recipe != "bit":
        raise ConfigError(f"recipe must be one of '' | bit | {' | '.join(RECIPES)}, got {cfg.recipe!r}")
    if cfg.test_source and not str(cfg.source).lower().endswith(".csv"):
        raise ConfigError("test_source is for a CSV source: folders and built-ins carry their own test split")
    if cfg.multilabel_loss not in ("bce", "asl"):
        raise ConfigError(f"multilabel_loss must be bce | asl, got {cfg.multilabel_loss!r}")
    if not 0.0 < cfg.threshold < 1.0:
        raise ConfigError(f"threshold is a probability in (0, 1), got {cfg.threshold}")
    if cfg.distill not in DISTILL_KINDS:
        raise ConfigError(f"distill must be one of {' | '.join(DISTILL_KINDS)}, got {cfg.distill!r}")
    if cfg.randaugment:
        try:
            parse_randaugment(cfg.randaugment)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise ConfigError("mixup and cutmix are Beta alphas: >= 0 (0 = off)")
    for key in ("mix_switch_prob", "reprob", "distill_alpha"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {getattr(cfg, key)}")
    if not 0.0 <= cfg.model_ema < 1.0:
        raise ConfigError(f"model_ema is a decay in [0, 1) (0 = off), got {cfg.model_ema}")
    if cfg.distill_tau <= 0:
        raise ConfigError(f"distill_tau must be > 0, got {cfg.distill_tau}")
    if not 1 <= cfg.repeated_aug <= cfg.batch_size:
        raise ConfigError(f"repeated_aug must be between 1 and batch_size, got {cfg.repeated_aug}")
    if cfg.teacher and cfg.distill == "none":
        raise ConfigError("a teacher is set but distill=none: choose distill=hard or distill=soft")
    if cfg.lr_search and cfg.lr is not None:
        raise ConfigError("set lr or lr_search, not both (lr_search chooses the lr)")
    if any(not v > 0 for v in cfg.lr_search):
        raise ConfigError(f"lr_search lists learning rates > 0, got {cfg.lr_search}")
    if not 0.0 < cfg.lr_search_holdout < 1.0:
        raise ConfigError(f"lr_search_holdout is a fraction in (0, 1), got {cfg.lr_search_holdout}")


def _num_classes(train_ds, test_ds) -> int:
    labels = [torch.as_tensor(d.labels) for d in (train_ds, test_ds)]
    if any(int(y.min()) < 0 for y in labels if y.numel()):
        raise ValueError("the dataset has unlabeled images (label -1): fine-tuning needs a labeled dataset")
    top = max(int(y.max()) + 1 for y in labels if y.numel())
    return max(top, len(getattr(train_ds, "classes", None) or []))


def _freeze(model: Classifier, cfg: FinetuneConfig) -> set[int]:
    """Set requires_grad for the mode; returns the layer ids of the backbone that stay frozen."""
    backbone, L = model.backbone, num_layers(model.backbone)
    if cfg.mode == "full":
        frozen: set[int] = set()
    elif cfg.mode == "linear":
        frozen = set(range(L + 2))
    else:
        if cfg.partial_blocks > L:
            raise ConfigError(f"partial_blocks={cfg.partial_blocks} but the backbone has {L} blocks")
        frozen = set(range(L + 1 - cfg.partial_blocks))
    for name, p in backbone.named_parameters():
        p.requires_grad_(layer_id_of(backbone, name) not in frozen)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return frozen


def _train_mode(model: Classifier, frozen: set[int]) -> None:
    """Train mode, except the frozen parts of the backbone (BatchNorm statistics, drop-path)."""
    model.train()
    for name, m in model.backbone.named_modules():
        if layer_id_of(model.backbone, name) in frozen:
            m.eval()


def _batches(ds, index_batches, num_workers: int, device: torch.device, refill: bool = False):
    """(uint8 images, targets) on ``device`` for each list of indices: indexed directly for data
    held in memory, decoded by DataLoader workers for image folders. One pair per list, in order.
    Undecodable files are dropped (a batch can come out empty), or with ``refill`` replaced by the
    batch's decodable images, as pretraining does: every batch then keeps its size, which the
    ranks of a torchrun need (they step together, and their shares' sizes set the loss weights)."""
    if hasattr(ds, "images"):
        for idx in index_batches:
            yield (ds.images[idx].to(device, non_blocking=True),
                   ds.labels[idx].to(device, non_blocking=True))
        return
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[b.tolist() for b in index_batches],
                                         num_workers=num_workers, collate_fn=getattr(ds, "collate_fn", collate_skip),
                                         pin_memory=device.type == "cuda")
    for idx, batch in zip(index_batches, loader):
        images, labels = batch["images"], batch["labels"]
        if refill and len(images) < len(idx):
            if len(images) == 0:
                raise RuntimeError(f"no image of a batch of {len(idx)} could be decoded (indices {idx[:8].tolist()}"
                                   f"{' ...' if len(idx) > 8 else ''}): check the files of the dataset")
            keep = torch.arange(len(idx)) % len(images)
            images, labels = images[keep], labels[keep]
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


@torch.no_grad()
def _predict(model: Classifier, ds, transform, batch_size: int, num_workers: int, device: torch.device,
             autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, targets) of the whole of ``ds`` in its order, float32 outputs on the CPU. Under
    torchrun each rank runs a contiguous shard (near-equal parts) and the shards are gathered, in
    rank order, to every rank: each sees what one process would."""
    model.eval()
    idx = torch.arange(len(ds)).tensor_split(D.world_size())[D.rank()]
    outputs, targets = [], []
    for images, y in _batches(ds, idx.split(batch_size), num_workers, device):
        if len(images) == 0:                 # no file of the batch decoded
            continue
        with autocast():
            outputs.append(model(transform(images)).float().cpu())
        targets.append(y.cpu())
    outputs, targets = torch.cat(outputs), torch.cat(targets)
    if D.world_size() > 1:       # the collectives move device tensors (NCCL: GPU only)
        outputs, targets = (D.all_gather_cat(t.to(device)).cpu() for t in (outputs, targets))
    return outputs, targets


def _evaluate(model: Classifier, ds, task, transform, batch_size: int, num_workers: int,
              device: torch.device, autocast) -> dict[str, float]:
    outputs, targets = _predict(model, ds, transform, batch_size, num_workers, device, autocast)
    return {k: float(v) for k, v in task.metrics(outputs, targets).items()}


def _views(augment, images: torch.Tensor, batch: int, gen: torch.Generator,
           rank_gen: torch.Generator) -> torch.Tensor:
    """Training views of this rank's share of a batch of ``batch`` images. One process: the
    augmentation on the batch from ``gen``. Under torchrun, plain crop + flip (BatchAugment) draws
    its parameters for the whole batch from ``gen``, which every rank holds alike, and applies the
    rows of its share: per-image parameters are drawn in order, so N processes make exactly the
    views of one. A recipe's views (RandAugment and erasing, per image on the CPU) are drawn from
    the rank's own ``rank_gen`` instead: random like one process's, but not the same images."""
    world = D.world_size()
    if world == 1:
        return augment(images, gen)
    if isinstance(augment, BatchAugment):
        params = augment.sample_params(batch, images.shape[-2], images.shape[-1], gen)
        return augment.apply(images, {k: v.tensor_split(world)[D.rank()] for k, v in params.items()})
    return augment(images, rank_gen)


def _save_classifier(model: nn.Module, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()}))


def _better(value: float, best: float | None) -> bool:
    """Higher is better; a NaN (a metric undefined on this epoch's outputs) never is."""
    return not math.isnan(value) and (best is None or math.isnan(best) or value > best)


_TRAIN_KEYS = ("epoch", "step", "loss", "base_loss", "distill_loss", "lr", "time_s")


def _test_metrics(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in _TRAIN_KEYS}


def _slowest(seconds: float, device: torch.device) -> float:
    """The largest of the ranks' ``seconds`` (the run's wall time), the same on every rank."""
    if D.world_size() == 1:
        return seconds
    return D.all_reduce_max(torch.tensor(seconds, dtype=torch.float64, device=device)).item()


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _plot_curves(history: list[dict], main_metric: str, path: Path) -> None:
    from keel.show import plt  # keel.show selects the file-only Agg backend
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([h["epoch"] for h in history], [h["loss"] for h in history], color="tab:blue")
    a.set(xlabel="epoch", ylabel="training loss", title="loss")
    evald = [h for h in history if main_metric in h]
    b.plot([h["epoch"] for h in evald], [h[main_metric] for h in evald], marker="o", color="tab:green")
    b.set(xlabel="epoch", ylabel=main_metric, title=f"test {main_metric}")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_CHECKPOINT = Path("checkpoints") / "last.pt"
_RESULT_ONLY = ("num_workers", "out_dir")     # config keys a resumed run may differ in


def _rank_rng(gen: torch.Generator, rank_gen: torch.Generator, device: torch.device) -> dict[str, list]:
    """Every rank's own random streams, gathered (a collective under torchrun): the torch CPU RNG
    (drop-path), CUDA's on GPU, and the rank's generator when it is not the shared one. Each value
    is a list with one state per rank."""
    own = {"torch": torch.get_rng_state()}
    if rank_gen is not gen:
        own["rank_gen"] = rank_gen.get_state()
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    if D.world_size() == 1:
        return {k: [v] for k, v in own.items()}
    # the collectives move device tensors (NCCL: GPU only); every state has the same length
    # (each row cloned: a view into the gathered tensor would be saved with the whole of it)
    return {k: [row.clone() for row in D.all_gather_cat(v.to(device).unsqueeze(0)).cpu()] for k, v in own.items()}


def _read_resume(run_dir: Path) -> dict:
    """The fine-tuning checkpoint of ``run_dir``, with one-line errors naming the file."""
    path = run_dir / _CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: no checkpoint at '{path}' (the run ended before its "
                                "first epoch did; start it again)")
    try:
        state = load_checkpoint(path)
    except Exception as e:            # truncated, not a torch file, or holding objects weights_only refuses
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"'{path}' is not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("kind") != "finetune":
        raise ValueError(f"'{path}' is not a keel finetune checkpoint")
    return state


# ---------------------------------------------------------------------------------- the loop
def finetune(backbone: nn.Module, train_ds, test_ds, cfg: FinetuneConfig, task: Task | None = None,
             run_dir: str | Path | None = None, progress: bool = True, teacher: nn.Module | None = None,
             resume: bool = False) -> dict:
    """Fine-tune ``backbone`` (in place, like MAE) with a head from ``task`` (default: classification
    over the datasets' labels) and return ``{"best": {"epoch", **metrics}, "final": {...},
    "main_metric", ...}`` plus ``"classifier"``, the trained :class:`Classifier` (left out of
    result.json). Afterwards every parameter's ``requires_grad`` is as it was; DropPath rates stay
    at the config's. With ``run_dir`` the artifacts listed in the module docstring are written.

    ``cfg.recipe`` is applied first (:func:`apply_recipe`, printed when ``progress``). With
    ``cfg.distill`` the teacher is ``teacher`` (a module giving class logits) or else loaded from
    ``cfg.teacher`` (:func:`keel.evaluate.distill.load_teacher`); the epoch records then carry
    ``base_loss`` and ``distill_loss`` too. With ``cfg.model_ema`` every evaluation also scores the
    EMA (``ema_<metric>``), the result has ``"best_ema"`` (its best epoch, by its own main metric)
    and ``"ema_classifier"`` (the EMA model, left out of result.json).

    With ``resume`` (``run_dir`` needed) the run continues from ``run_dir/checkpoints/last.pt``,
    written at the end of every epoch: call it with the same backbone (its initial weights do not
    matter, they are replaced), data and config (checked against the checkpoint's) and the same
    number of processes. A run whose last epoch is done and whose result.json exists is not trained
    again: its saved result comes back, with the checkpoint's classifier (and EMA)."""
    # Under torchrun this process joins the group (nothing happens for one process, or when the
    # group exists already). Only rank 0 prints, shows progress and writes run_dir.
    device = D.init_distributed(cfg.device).device
    world, rank = D.world_size(), D.rank()
    progress = progress and rank == 0
    cfg = apply_recipe(cfg, verbose=progress)
    _check(cfg)
    if cfg.lr_search:
        raise ConfigError("lr_search is run_finetune's (or keel.evaluate.lr_search.search_lr's): finetune() "
                          "trains one lr")
    if resume and run_dir is None:
        raise ConfigError("resume=True needs the run_dir to resume")
    if world > 1 and len(test_ds) < world:
        raise ConfigError(f"{len(test_ds)} test images cannot be shared by {world} processes")
    t0 = time.perf_counter()
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    task = task if task is not None else ClassificationTask(_num_classes(train_ds, test_ds), cfg.label_smoothing)
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    if (mixing or cfg.distill != "none") and not isinstance(task, ClassificationTask):
        raise ConfigError("mixup, cutmix and distillation need a single-label classification task")
    if cfg.distill == "none" and teacher is not None:
        raise ConfigError("a teacher was given but distill=none: choose distill=hard or distill=soft")
    if cfg.distill != "none" and teacher is None:
        if not cfg.teacher:
            raise ConfigError(f"distill={cfg.distill} needs a teacher: "
                              "set teacher=<finetune run | timm:<model>:<file> | random:<model>>")
        teacher = load_teacher(cfg.teacher, task.num_classes, cfg.img_size, seed=cfg.seed)
    if teacher is not None:
        teacher = teacher.eval().to(device)
    opt_name = cfg.optimizer
    base_lr = DEFAULT_LR[opt_name] if cfg.lr is None else cfg.lr
    weight_decay = DEFAULT_WEIGHT_DECAY[opt_name] if cfg.weight_decay is None else cfg.weight_decay

    torch.manual_seed(cfg.seed)                       # head init, drop-path
    gen = torch.Generator().manual_seed(cfg.seed)     # data order, views
    was_trainable = [(p, p.requires_grad) for p in backbone.parameters()]
    # a distilled DeiT learns from the teacher through its own token and head (not in linear mode,
    # whose feature BatchNorm is for one pooled feature; there the one head learns from both)
    two_heads = cfg.distill != "none" and getattr(backbone, "dist_token", None) is not None and cfg.mode != "linear"
    head = DistilledHead(task.head(backbone.num_features), task.head(backbone.num_features)) if two_heads \
        else task.head(backbone.num_features)
    model = Classifier(backbone, head, feature_norm=cfg.mode == "linear", frozen_backbone=cfg.mode == "linear")
    frozen = _freeze(model, cfg)
    set_drop_path(backbone, cfg.drop_path_rate)
    model.to(device)
    # Under torchrun the data order and the crop + flip parameters stay on ``gen``, alike on every
    # rank (see _views); what a rank draws for its own images only (drop-path, a recipe's per-image
    # operations, Mixup/CutMix) comes from streams of its own, so ranks do not repeat each other.
    rank_gen = gen
    if world > 1:
        rank_gen = torch.Generator().manual_seed(D.seed_for(cfg.seed, rank))
        torch.manual_seed(D.seed_for(cfg.seed, rank, 1))
    ema = None
    if cfg.model_ema > 0:
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
    groups = layer_decay_param_groups(model, weight_decay, cfg.layer_decay)
    if opt_name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=base_lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum)
    state = None
    if resume:
        # every rank reads the same file (written by rank 0), before DDP wraps the model
        state = _read_resume(Path(run_dir))
        saved, now = state["config"], to_dict(cfg)
        differ = sorted(k for k in set(saved) | set(now) if k not in _RESULT_ONLY and saved.get(k) != now.get(k))
        if differ:
            raise ConfigError(f"the checkpoint in '{run_dir}' was made with other values of "
                              f"{', '.join(differ)}: resume with the run's own config.yaml")
        if state["world_size"] != world:
            raise ConfigError(f"the checkpoint in '{run_dir}' was made by {state['world_size']} process(es): "
                              f"resume with as many, not {world}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if state["epoch"] == cfg.epochs and (Path(run_dir) / "result.json").is_file():
            for p, flag in was_trainable:
                p.requires_grad_(flag)
            if progress:
                print(f"'{run_dir}' is complete ({cfg.epochs} epochs): nothing to train")
            out = dict(json.loads((Path(run_dir) / "result.json").read_text()), classifier=model)
            if ema is not None:
                out["ema_classifier"] = ema
            return out

    # Each epoch is cut into ceil(n / batch_size) batches of near-equal size: no image is left out
    # and no batch is tiny (BatchNorm needs a few images). The lr scales with the configured batch
    # size, also when a small (few-shot) training set makes the batches smaller.
    n = len(train_ds)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    lr = base_lr * cfg.batch_size / 256

    def lr_at(step: int) -> float:
        if cfg.schedule == "step":
            return step_lr(step, total_steps, lr, warmup_steps, cfg.milestones)
        return cosine_lr(step, total_steps, lr, warmup_steps)

    view = ViewConfig(size=cfg.img_size, scale=(0.35, 1.0), hflip=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    augment = RecipeAugment(view, cfg.randaugment, cfg.reprob) if cfg.randaugment or cfg.reprob > 0 \
        else BatchAugment(view)
    mixer = MixupCutmix(task.num_classes, cfg.mixup, cfg.cutmix, cfg.mix_switch_prob) if mixing else None
    eval_transform = make_eval_transform(cfg.img_size)

    # Under torchrun the training forward goes through DistributedDataParallel, which averages the
    # trainable parameters' gradients over the ranks (frozen ones have requires_grad off and are
    # left out). BatchNorm in train mode: synchronised on GPU, so it normalises with the whole
    # batch's statistics as one process does; gloo (CPU) has no SyncBatchNorm, and each rank
    # normalises with its own share's and updates its own running statistics (made rank 0's after
    # every step, below). Evaluation and the EMA use ``model`` itself, outside DDP.
    train_model = model
    if world > 1:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)

    history: list[dict] = []
    best: dict | None = None
    best_ema: dict | None = None
    step, start_epoch, seconds_before = 0, 0, 0.0
    if state is not None:
        history, best, best_ema = state["history"], state["best"], state["best_ema"]
        step, start_epoch, seconds_before = state["step"], state["epoch"], state["seconds"]
        # the random streams as they were after that epoch: the data order and views (shared),
        # and this rank's own (drop-path, a recipe's per-image draws)
        gen.set_state(state["gen"])
        rng = state["rng"]
        # (cloned: the setters want a tensor of its own, not a view with an offset)
        torch.set_rng_state(rng["torch"][rank].clone())
        if "rank_gen" in rng:
            rank_gen.set_state(rng["rank_gen"][rank].clone())
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][rank].clone(), device)
        if progress:
            print(f"resumed '{run_dir}' after epoch {start_epoch} of {cfg.epochs} (step {step})")
    metrics_file = None
    writes = run_dir is not None and rank == 0
    if writes:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        # a resumed run keeps the lines of the epochs it keeps (lines of a redone epoch go)
        metrics_file = open(run_dir / "metrics.jsonl", "w")
        metrics_file.writelines(json.dumps(rec) + "\n" for rec in history)
        metrics_file.flush()
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, desc=f"finetune ({cfg.mode})", unit="step", dynamic_ncols=True,
               disable=not progress, mininterval=1.0)
    cur_lr = lr_at(step)
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            _train_mode(model, frozen)
            if cfg.repeated_aug > 1:
                index_batches = repeated_batches(n, steps_per_epoch, cfg.repeated_aug, gen)
            else:
                index_batches = torch.randperm(n, generator=gen).tensor_split(steps_per_epoch)
            # Every rank has the same index batches (gen is seeded alike everywhere) and loads its
            # contiguous share of each: the shares together are exactly one process's batch.
            if world > 1 and min(len(b) for b in index_batches) < world:
                raise ConfigError(f"a batch of {min(len(b) for b in index_batches)} images cannot be shared by "
                                  f"{world} processes: raise batch_size or use fewer processes")
            shares = [b.tensor_split(world)[rank] for b in index_batches]
            refill = world > 1               # under torchrun no share may shrink (see _batches)
            loaded = _batches(train_ds, shares, cfg.num_workers, device, refill)
            sums = {k: torch.zeros((), device=device) for k in ("loss", "base_loss", "distill_loss")}
            loss_count = 0
            for idx, (images, targets) in zip(index_batches, loaded):
                if len(images) == 0:                           # no file of the batch decoded (one process)
                    continue
                cur_lr = lr_at(step)
                apply_lr(optimizer, cur_lr)
                with torch.no_grad():
                    x = _views(augment, images, len(idx), gen, rank_gen)
                    if mixer is not None:
                        x, targets = mixer(x, targets, rank_gen)   # soft targets (B, classes)
                    if teacher is not None:                    # the teacher sees the mixed batch
                        with autocast():
                            teacher_logits = teacher(x).float()
                with autocast():
                    outputs = train_model(x)
                # the loss in float32 whatever the autocast
                outputs = tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()
                if teacher is not None:
                    parts = distillation_loss(outputs, teacher_logits, targets, cfg.distill, cfg.distill_tau,
                                              cfg.distill_alpha, base_loss=task.loss)
                else:
                    parts = {"loss": task.loss(outputs, targets)}
                if world > 1:
                    # Each rank's loss is the mean over its share and DDP averages the gradients:
                    # weighted by the share's part of the batch (shares differ by an image when
                    # the batch does not divide), that average is the gradient of the whole
                    # batch's mean loss, as one process computes it.
                    weight = world * len(images) / len(idx)
                    parts = {k: v * weight for k, v in parts.items()}
                loss = parts["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad > 0:
                    nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.clip_grad)
                optimizer.step()
                # torchrun: rank 0's BatchNorm statistics everywhere, so that the EMA update and the
                # evaluation, which come before DDP's next forward syncs them, see one model
                D.broadcast_buffers(model)
                if ema is not None:
                    update_ema(ema, model, cfg.model_ema)
                for k, v in parts.items():
                    sums[k] += v.detach()
                loss_count += 1
                step += 1
                bar.update(1)
            # the mean over ranks of the weighted losses: the epoch's mean batch loss on every rank
            means = {k: D.all_reduce_mean(v / max(1, loss_count)) for k, v in sums.items()}
            train_loss = means["loss"].item()
            if not math.isfinite(train_loss):
                raise RuntimeError(f"the training loss became {train_loss} in epoch {epoch}: lower lr or set clip_grad")
            rec = {"epoch": epoch, "step": step, "loss": train_loss, "lr": cur_lr}
            if teacher is not None:
                rec.update({k: means[k].item() for k in ("base_loss", "distill_loss")})
            if epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
                eval_batch = max(cfg.batch_size, 256)
                rec.update(_evaluate(model, test_ds, task, eval_transform, eval_batch, cfg.num_workers,
                                     device, autocast))
                if ema is not None:
                    ema_metrics = _evaluate(ema, test_ds, task, eval_transform, eval_batch, cfg.num_workers,
                                            device, autocast)
                    rec.update({f"ema_{k}": v for k, v in ema_metrics.items()})
                    if _better(ema_metrics[task.main_metric], best_ema[task.main_metric] if best_ema else None):
                        best_ema = {"epoch": epoch, **ema_metrics}
                if _better(rec[task.main_metric], best[task.main_metric] if best else None):
                    best = {"epoch": epoch, **_test_metrics(rec)}
                    if writes:
                        _save_classifier(model, run_dir / "classifier_best.safetensors",
                                         {"epoch": epoch, task.main_metric: rec[task.main_metric]})
                bar.set_postfix(loss=f"{train_loss:.3f}", **{task.main_metric: f"{rec[task.main_metric]:.2f}"})
            rec["time_s"] = round(seconds_before + time.perf_counter() - t0, 2)
            history.append(rec)
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            if run_dir is not None:
                rng = _rank_rng(gen, rank_gen, device)          # a collective: every rank takes part
                if writes:
                    save_checkpoint(run_dir / _CHECKPOINT, {
                        "kind": "finetune", "epoch": epoch, "step": step, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                        "gen": gen.get_state(), "rng": rng, "best": best, "best_ema": best_ema,
                        "history": history, "config": to_dict(cfg), "world_size": world,
                        "seconds": seconds_before + time.perf_counter() - t0})
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        for p, flag in was_trainable:
            p.requires_grad_(flag)

    last = history[-1]
    result = {
        "main_metric": task.main_metric,
        "best": best,
        "final": {"epoch": last["epoch"], **_test_metrics(last)},
        "mode": cfg.mode,
        "epochs": cfg.epochs,
        "steps": step,
        "train_images": n,
        "test_images": len(test_ds),
        "trainable_params": sum(p.numel() for g in groups for p in g["params"]),
        "seconds": round(_slowest(seconds_before + time.perf_counter() - t0, device), 2),
    }
    if cfg.recipe:
        result["recipe"] = cfg.recipe
    if teacher is not None:
        result["distill"] = cfg.distill
    if ema is not None:
        result["best_ema"] = best_ema
    if writes:
        _save_classifier(model, run_dir / "classifier.safetensors", {"epoch": last["epoch"]})
        if ema is not None:
            _save_classifier(ema, run_dir / "classifier_ema.safetensors",
                             {"epoch": last["epoch"], "model_ema": cfg.model_ema})
        _write_json(run_dir / "result.json", result)
        _plot_curves(history, task.main_metric, run_dir / "curves.png")
    D.barrier()                         # torchrun: rank 0's files exist when any rank returns
    out = dict(result, classifier=model)
    if ema is not None:
        out["ema_classifier"] = ema
    return out


# ---------------------------------------------------------------------------------- backbones
def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors (no code runs) or a torch file (``weights_only``: no code
    runs either); a checkpoint holding it under "model", "state_dict" or "module" is unwrapped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no weights file at '{path}'")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p), device="cpu")
    sd = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"'{path}' does not hold a state dict")
    return sd


def _keel_name(name: str) -> str:
    """A keel model name, or the keel name of a timm model name (a family's TIMM_NAMES)."""
    import importlib

    from keel.models.registry import list_models
    models = list_models()
    if name in models:
        return name
    for n in models:
        family = importlib.import_module(family_of(n))
        if getattr(family, "TIMM_NAMES", {}).get(n) == name:
            return n
    raise ValueError(f"unknown model '{name}': give a keel model name (`keel models` lists them)")


def _fit_pos_embed(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Resample a ViT position table made for another image size to the model's (bicubic; the
    class/distillation tokens' entries are kept as they are)."""
    from keel.models.layers.position import interpolate_pos_embed
    pe, own = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if pe is None or own is None or pe.shape == own.shape:
        return
    prefix = model.num_prefix_tokens
    src = math.isqrt(pe.shape[1] - prefix)
    if src * src != pe.shape[1] - prefix:
        raise ValueError(f"pos_embed of {pe.shape[1]} entries is not {prefix} prefix tokens + a square grid")
    patches = interpolate_pos_embed(pe[:, prefix:], (src, src), (model.grid, model.grid))
    sd["pos_embed"] = torch.cat([pe[:, :prefix], patches], dim=1)


def read_timm_spec(spec: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``timm:<model>:<file>`` -> (keel model name, the file's state dict converted to keel's names)."""
    from keel.convert import from_timm
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise ValueError(f"'{spec}': write timm:<model name>:<path to its state dict>")
    name = _keel_name(parts[1])
    return name, from_timm(name, _read_state_dict(parts[2]))


def load_for_finetune(spec: str, img_size: int, seed: int = 0) -> nn.Module:
    """A backbone to fine-tune at ``img_size``, from ``spec``:

    * a keel finetune run directory or one of its ``classifier*.safetensors``: its backbone without
      the head (BiT's upstream -> downstream chain);
    * a keel run directory or its ``backbone.safetensors`` (with ``card.json`` beside it), rebuilt
      at ``img_size`` when pretrained at another size (a ViT's position table is resampled; a
      model whose other weights depend on the size must be fine-tuned at its pretraining size);
    * ``timm:<model>:<file>``: a timm state dict (``.safetensors``, or ``.pth``/``.pt`` read with
      ``weights_only``) of keel model ``<model>`` (or its timm name), converted with
      ``keel.convert.from_timm``; its classifier head is dropped;
    * ``random:<model>``: randomly initialised (seeded), the from-scratch baseline.
    """
    from keel.models.registry import create_model
    if spec.startswith("random:"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return create_model(_keel_name(spec[len("random:"):]), img_size=img_size)
    if spec.startswith("timm:"):
        name, sd = read_timm_spec(spec)
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
        model = create_model(name, img_size=img_size)
        _fit_pos_embed(model, sd)
        model.load_state_dict(sd)
        return model
    from safetensors.torch import load_file

    from keel.engine.checkpoint import load_backbone, read_card, sha256
    from keel.evaluate.distill import _classifier_files
    files = _classifier_files(spec)
    if files is not None:
        return _finetuned_backbone(*files, img_size=img_size)
    weights, card = read_card(spec)
    kwargs = dict(card.get("model_kwargs", {}))
    if kwargs.get("img_size", img_size) == img_size:
        return load_backbone(spec)
    if card.get("sha256") and sha256(weights) != card["sha256"]:
        raise ValueError(f"'{weights}' does not match the sha256 in its card.json: the file was changed or damaged")
    pretrained_at = kwargs["img_size"]
    model = create_model(card["model"], **dict(kwargs, img_size=img_size))
    sd = load_file(str(weights), device="cpu")
    _fit_pos_embed(model, sd)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"'{spec}' was pretrained at {pretrained_at} px and its weights do not fit "
                         f"{card['model']} built for {img_size} px: fine-tune at img_size={pretrained_at}"
                         f" ({str(e).splitlines()[0]})") from None
    return model


def _finetuned_backbone(weights: Path, config: Path, img_size: int) -> nn.Module:
    """The backbone of a keel finetune run (e.g. BiT upstream: ``recipe=bit-upstream``), its head
    left behind, built at ``img_size`` (a ViT's position table resampled)."""
    from safetensors.torch import load_file

    from keel.config import load_config
    if not config.is_file():
        raise FileNotFoundError(f"'{weights}' has no config.yaml beside it: its architecture is unknown")
    upstream = load_config(config, cls=FinetuneConfig)
    if not upstream.backbone:
        raise ValueError(f"'{config}' names no backbone (the run came from finetune() with a module)")
    model = load_for_finetune(upstream.backbone, img_size, seed=upstream.seed)   # the architecture at img_size
    sd = {k[len("backbone."):]: v for k, v in load_file(str(weights), device="cpu").items()
          if k.startswith("backbone.")}
    _fit_pos_embed(model, sd)
    model.load_state_dict(sd)
    return model


def default_run_dir(cfg: FinetuneConfig) -> Path:
    what = cfg.backbone.rstrip("/").split(":")[1] if cfg.backbone.startswith(("timm:", "random:")) \
        else Path(cfg.backbone.rstrip("/")).name
    data = Path(cfg.source).stem if str(cfg.source).lower().endswith(".csv") else Path(cfg.source).name
    return Path(cfg.out_dir) / "-".join(["finetune", cfg.mode, what or "backbone", data or "data",
                                         time.strftime("%Y%m%d-%H%M%S")])


def run_finetune(cfg: FinetuneConfig | None, run_dir: str | Path | None = None, progress: bool = True,
                 resume: bool = False) -> dict:
    """Everything from a config: load ``cfg.backbone``, the labeled data of ``cfg.source``
    (:func:`labeled_data`), then :func:`finetune` into ``run_dir`` (default: a new folder under
    ``cfg.out_dir``). Under torchrun every process runs this: it joins the process group (NCCL on
    GPU, gloo on CPU) and leaves it at the end if it was the one to create it; rank 0 prints and
    writes ``run_dir`` (the default's time stamp is then rank 0's clock).

    ``resume``: continue the run in ``run_dir`` from its last checkpoint, with the config.yaml saved
    there (``cfg`` None, or the same config: another one is refused). A finished run is not
    trained again; its result.json comes back.

    ``cfg.lr_search`` (filled by ``recipe=bit`` when ``lr`` is unset): the lr is first chosen on
    held-out training images (:mod:`keel.evaluate.lr_search`, files under ``run_dir/lr-search``);
    the result then has ``"lr_search"`` (the scores and the chosen lr). Resuming a run stopped
    during the search keeps the candidates already scored and resumes the one that was running."""
    if resume:
        if run_dir is None:
            raise ConfigError("resume needs the run directory")
        run_dir = Path(run_dir)
        searched = search_config_path(run_dir)
        # stopped during the lr search, or after it before the final run's first epoch ended:
        # the search goes on from its scores, then the final run starts
        if not (run_dir / _CHECKPOINT).is_file() and searched.is_file():
            saved = load_config(searched, cls=FinetuneConfig)
        elif not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"'{run_dir}' is not a finetune run directory (no config.yaml in it)")
        elif not (run_dir / _CHECKPOINT).is_file():
            raise FileNotFoundError(f"nothing to resume: no checkpoint at '{run_dir / _CHECKPOINT}' (the run ended "
                                    "before its first epoch did; start it again)")
        else:
            saved = load_config(run_dir / "config.yaml", cls=FinetuneConfig)
        if cfg is not None and cfg != saved and apply_recipe(cfg, verbose=False) != saved:
            raise ConfigError(f"resuming '{run_dir}' uses its own config.yaml: pass no other config")
        cfg = saved
    elif cfg is None:
        raise ConfigError("no config given (cfg=None is for resume=True)")
    if not cfg.backbone:
        raise ConfigError("backbone is not set: a run directory, timm:<model>:<file> or random:<model>")
    _check(cfg)
    import torch.distributed as dist
    created = not (dist.is_available() and dist.is_initialized())
    D.init_distributed(cfg.device)
    created = created and dist.is_initialized()
    try:
        return _run_finetune(cfg, run_dir, progress and D.rank() == 0, resume)
    finally:
        if created:
            dist.destroy_process_group()


def _run_finetune(cfg: FinetuneConfig, run_dir: str | Path | None, progress: bool, resume: bool = False) -> dict:
    train_ds, test_ds, task = labeled_data(cfg)
    if cfg.recipe == "bit":
        size = cfg.img_size
        cfg = bit_recipe(cfg, progress, train_ds)
        if task is not None and cfg.mixup > 0:
            if progress:
                print(f"  mixup {cfg.mixup:g} left out: MixUp is for single-label classification")
            cfg = replace(cfg, mixup=0.0)
        if cfg.img_size != size:                                # decoded again at HyperRule's resolution
            train_ds, test_ds, task = labeled_data(cfg)
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    if cfg.lr_search:
        cfg, _ = search_lr(cfg, train_ds, task, run_dir, progress, resume)
    backbone = load_for_finetune(cfg.backbone, cfg.img_size, seed=cfg.seed)
    result = finetune(backbone, train_ds, test_ds, cfg, task=task, run_dir=run_dir, progress=progress,
                      resume=resume and (run_dir / _CHECKPOINT).is_file())
    if (run_dir / SEARCH_DIR / "scores.json").is_file():
        result["lr_search"] = json.loads((run_dir / SEARCH_DIR / "scores.json").read_text())
    return result


def labeled_data(cfg: FinetuneConfig):
    """``(train, test, task)`` for ``cfg.source`` at ``cfg.img_size``.

    * A ``.csv`` file (:class:`keel.data.labels.LabeledCSV`): its header picks the task, ``image,labels``
      a :class:`~keel.evaluate.multilabel.MultiLabelTask` (``cfg.multilabel_loss``, ``cfg.threshold``)
      and ``image,primary,secondary`` a :class:`~keel.evaluate.multilabel.TwoLevelTask` with the file's
      hierarchy. The test split is ``cfg.test_source`` (read with the training file's class lists, so
      ids agree) or else every 5th row, as a labeled folder without a test split is held out.
    * Anything else: single-label classification on :func:`keel.data.sources.labeled_splits`
      (``task`` is None: :func:`finetune` builds the classification task from the labels)."""
    from keel.data.sources import DataError, labeled_splits
    _check(cfg)
    if not str(cfg.source).lower().endswith(".csv"):
        train, test = labeled_splits(cfg.source, cfg.img_size)
        return train, test, None
    from keel.data.labels import LabeledCSV
    from keel.evaluate.multilabel import MultiLabelTask, TwoLevelTask
    train = LabeledCSV(cfg.source, cfg.img_size)
    if train.kind == "multilabel":
        classes = dict(classes=train.classes)
    else:
        classes = dict(primary_classes=train.primary_classes, secondary_classes=train.secondary_classes)
    if cfg.test_source:
        try:
            test = LabeledCSV(cfg.test_source, cfg.img_size, **classes)
        except ValueError as e:      # the class lists of one kind given to a file of the other
            raise DataError(f"test_source and source are different kinds of label file ('{cfg.source}' "
                            f"is {train.kind}): {e}") from None
    else:
        ids = torch.arange(len(train))
        train, test = train.subset(ids[ids % 5 != 0]), train.subset(ids[ids % 5 == 0])
        if len(test) == 0:
            raise DataError(f"'{cfg.source}' has too few rows to hold out a test split (every 5th row): "
                            "give test_source=<test csv>")
    if train.kind == "multilabel":
        task = MultiLabelTask(len(train.classes), loss=cfg.multilabel_loss, threshold=cfg.threshold,
                              class_names=train.classes)
    else:
        task = TwoLevelTask(len(train.primary_classes), len(train.secondary_classes), hierarchy=train.hierarchy_ids)
    return train, test, task


_NATIVE_SIDE = {"digits": 8, "fashion-mnist": 28}     # the built-ins' own image side, HyperRule's input


def bit_recipe(cfg: FinetuneConfig, progress: bool, train_ds=None) -> FinetuneConfig:
    """``recipe=bit``: BiT-HyperRule's choices from the training-set size and the images' own side
    (the first image's, for a folder or a CSV), printed with the reasons. ``train_ds``: the
    training split when already loaded (else :func:`labeled_data` reads it).

    The lr: the user's when set; else ``lr_search`` when set; else ``lr_search`` becomes
    :data:`keel.evaluate.lr_search.BIT_LR_GRID` (in keel's per-256 unit), BiT's fixed 0.003 and
    half-decade steps around it, and :func:`run_finetune` picks one on held-out training images."""
    from PIL import Image

    from keel.evaluate.hyperrule import hyperrule_config
    if train_ds is None:
        train_ds = labeled_data(cfg)[0]
    side = _NATIVE_SIDE.get(cfg.source)
    if side is None and getattr(train_ds, "paths", None):
        with Image.open(train_ds.paths[0]) as im:
            side = im.size[::-1]
    user_lr = cfg.lr
    cfg, text = hyperrule_config(cfg, len(train_ds), side or cfg.img_size, max_side=cfg.recipe_max_side or None)
    if user_lr is not None:
        cfg = replace(cfg, lr=user_lr)
        text += f"\n  lr: {user_lr:g} per 256, yours (lr=0.0015 is BiT's own 0.003 per 512)"
    elif cfg.lr_search:
        cfg = replace(cfg, lr=None)
        text += f"\n  lr: chosen from your lr_search {cfg.lr_search} on held-out training images"
    else:
        cfg = replace(cfg, lr=None, lr_search=[v * 256 / 512 for v in BIT_LR_GRID])
        text += (f"\n  lr: instead of BiT's fixed 0.003, chosen from {', '.join(f'{v:g}' for v in BIT_LR_GRID)} "
                 f"per 512 on {cfg.lr_search_holdout:g} of the training images held out (keel's one change to "
                 "the rule, keel.evaluate.lr_search; lr=0.0015 per 256 keeps BiT's value)")
    if progress:
        print(text)
    return cfg
