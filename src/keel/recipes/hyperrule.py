"""BiT-HyperRule: the fine-tuning hyper-parameters Big Transfer (Kolesnikov et al., 2020) picks from
two numbers only, the training-set size and the image resolution, so that one rule serves every
downstream task without a search.

The rule (the official code's ``bit_hyperrule.py``):

* SGD, momentum 0.9, lr 0.003 for a batch of 512, no weight decay, no dropout;
* a schedule of step counts by training-set size: < 20k images ``[100, 200, 300, 400, 500]``,
  < 500k ``[500, 3000, 6000, 9000, 10000]``, else ``[500, 6000, 12000, 18000, 20000]``; the first
  number ends a linear warm-up, each middle one divides the lr by 10, the last ends training;
* MixUp with alpha 0.1 from 20k images on (none below);
* images smaller than 96 x 96 in area are resized to 160 and randomly cropped to 128, larger
  ones resized to 512 and cropped to 480.

:func:`hyperrule` returns these choices; :func:`hyperrule_config` turns them into a
:class:`~keel.config.FinetuneConfig`, whose schedule is counted in epochs with
fractional milestones, and explains the conversion in words.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from keel.config import FinetuneConfig, override

__all__ = ["HyperRuleChoice", "hyperrule", "hyperrule_config", "BIT_BATCH", "BIT_LR"]

BIT_BATCH = 512     # the batch size BiT's schedule counts steps of
BIT_LR = 0.003      # at that batch size
SMALL_DATA, LARGE_DATA = 20_000, 500_000
SMALL_AREA = 96 * 96

_SCHEDULES = {
    "small": [100, 200, 300, 400, 500],
    "medium": [500, 3000, 6000, 9000, 10000],
    "large": [500, 6000, 12000, 18000, 20000],
}


@dataclass(frozen=True)
class HyperRuleChoice:
    """What BiT-HyperRule picks for one dataset. Step counts are for batches of 512 images."""

    n_train: int
    image_area: int                 # height x width of the dataset's images, the rule's input
    size_bucket: str                # small (< 20k) | medium (< 500k) | large
    schedule: list[int]             # [warm-up end, decay, decay, decay, end], in steps
    mixup_alpha: float
    resize: int                     # side images are resized to ...
    crop: int                       # ... before a random crop of this side (and test images resized to it)
    lr: float = BIT_LR              # for ``batch_size`` images per step
    batch_size: int = BIT_BATCH
    momentum: float = 0.9
    weight_decay: float = 0.0

    @property
    def warmup_steps(self) -> int:
        return self.schedule[0]

    @property
    def decay_steps(self) -> list[int]:
        """The steps after which the lr is divided by 10."""
        return self.schedule[1:-1]

    @property
    def total_steps(self) -> int:
        return self.schedule[-1]


def _area(image_side) -> int:
    if isinstance(image_side, (tuple, list)):
        h, w = (int(v) for v in image_side)
    else:
        h = w = int(image_side)
    if h < 1 or w < 1:
        raise ValueError(f"image_side must be positive, got {image_side!r}")
    return h * w


def hyperrule(n_train: int, image_side) -> HyperRuleChoice:
    """BiT-HyperRule for ``n_train`` training images of side ``image_side`` (an int for square
    images, or ``(height, width)``): the rule compares the image *area* with 96 x 96."""
    n_train = int(n_train)
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    area = _area(image_side)
    bucket = "small" if n_train < SMALL_DATA else "medium" if n_train < LARGE_DATA else "large"
    resize, crop = (160, 128) if area < SMALL_AREA else (512, 480)
    return HyperRuleChoice(n_train=n_train, image_area=area, size_bucket=bucket, schedule=list(_SCHEDULES[bucket]),
                           mixup_alpha=0.0 if n_train < SMALL_DATA else 0.1, resize=resize, crop=crop)


# other recipes' augmentations, and their "off" values
_NOT_IN_BIT = {"aug.randaugment": "", "aug.cutmix": 0.0, "aug.reprob": 0.0, "train.repeated_aug": 1}


def hyperrule_config(base: FinetuneConfig, n_train: int, image_side, batch_size: int | None = None,
                     scale_steps: float = 1.0, max_side: int | None = None) -> tuple[FinetuneConfig, str]:
    """``base`` with the fields BiT-HyperRule decides replaced, and a multi-line explanation.

    The conversion from BiT's steps of 512 images to keel's epochs:

    * ``batch_size`` (default 512, never more than ``n_train``: keel's batches cannot hold more
      images than the training set) sets ``train.batch_size``. keel's lr is given per 256 images and
      scaled linearly, so ``train.lr = 0.003 * 256 / 512 = 0.0015`` at every batch size.
    * The number of images seen is kept: ``epochs = ceil(total_steps * 512 / n_train)``, rounded
      *up* so that training is never shorter than BiT's (at most one epoch longer). At a smaller
      batch the same images take more, smaller steps; the linear lr scaling keeps each image's
      contribution the same.
    * The schedule keeps its shape: ``milestones`` are BiT's decay steps divided by its total
      (e.g. 200/500 = 0.4) and ``warmup_epochs = epochs * warmup_steps / total_steps``, so the
      warm-up and the decays land at the same fractions of the (rounded) run.
    * ``scale_steps`` multiplies BiT's step counts first (e.g. 0.1 for a quick look; fractions
      do not change), ``max_side`` caps the crop side (and the resize side in proportion) for
      small CPU runs.
    * MixUp alpha goes to ``aug.mixup``; label smoothing and
      drop-path are switched off (BiT uses neither), and so are other recipes' augmentations
      (``randaugment``, ``cutmix``, ``reprob``,
      ``repeated_aug``); optimizer SGD momentum 0.9, weight decay 0, step schedule, no layer-wise
      decay. ``mode`` and the other fields (model EMA, distillation, ...) stay as in ``base``.

    Decode the training images at ``choice.resize`` (``cfg.img_size`` is the crop): keel's random
    resized crop then plays BiT's resize-and-crop, and test images are resized to the crop side
    as BiT does. Returns ``(cfg, explanation)``."""
    if scale_steps <= 0:
        raise ValueError(f"scale_steps must be > 0, got {scale_steps}")
    choice = hyperrule(n_train, image_side)
    n = choice.n_train
    batch = min(int(batch_size or BIT_BATCH), n)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = choice.total_steps * scale_steps
    epochs = max(1, math.ceil(total * BIT_BATCH / n))
    steps_per_epoch = math.ceil(n / batch)
    milestones = [s / choice.total_steps for s in choice.decay_steps]
    warmup_epochs = epochs * choice.warmup_steps / choice.total_steps
    crop, resize = choice.crop, choice.resize
    if max_side is not None and max_side < crop:
        crop, resize = int(max_side), max(int(max_side), round(choice.resize * max_side / choice.crop))
    lr_per_256 = BIT_LR * 256 / BIT_BATCH

    updates = {"train.optimizer": "sgd", "train.momentum": 0.9, "train.lr": lr_per_256, "train.weight_decay": 0.0,
               "train.schedule": "step", "train.milestones": milestones, "train.warmup_epochs": warmup_epochs,
               "train.epochs": epochs, "train.batch_size": batch, "data.img_size": crop, "train.layer_decay": 1.0,
               "task.label_smoothing": 0.0, "model.drop_path_rate": 0.0, "aug.mixup": choice.mixup_alpha,
               "recipe.name": "bit"}
    # BiT's only augmentations are the crop, the flip and MixUp: other recipes' extras go off
    off = {k: v for k, v in _NOT_IN_BIT.items() if getattr(getattr(base, k.split(".")[0]), k.split(".")[1]) != v}
    updates.update(off)
    cfg = override(base, updates)

    keel_steps = epochs * steps_per_epoch
    images_seen = epochs * n
    mixup_line = f"mixup: alpha {choice.mixup_alpha:g} -> aug.mixup"
    scaled = f" x {scale_steps:g} (scale_steps) = {total:g}" if scale_steps != 1.0 else ""
    cap = f" (capped from {choice.crop} by max_side)" if crop != choice.crop else ""
    explanation = "\n".join([
        f"BiT-HyperRule for {n:,} training images of area {choice.image_area:,} px:",
        f"  data size: {'< 20k' if choice.size_bucket == 'small' else '< 500k' if choice.size_bucket == 'medium' else '>= 500k'}"
        f" images -> schedule {choice.schedule} steps of {BIT_BATCH}"
        f" (warm-up to {choice.warmup_steps}, lr / 10 after {', '.join(map(str, choice.decay_steps))}, end at "
        f"{choice.total_steps}{scaled})",
        f"  resolution: area {'<' if choice.image_area < SMALL_AREA else '>='} 96x96 -> resize {resize}, "
        f"random crop {crop}{cap}; test images resized to {crop}",
        f"  {mixup_line}" + (f"; switched off (not in BiT): {', '.join(sorted(off))}" if off else ""),
        f"  optimizer: SGD momentum 0.9, lr {BIT_LR} per {BIT_BATCH} = {lr_per_256:g} per 256 (keel's unit),"
        f" {lr_per_256 * batch / 256:g} at batch {batch}; no weight decay, no label smoothing, no drop-path",
        f"  in epochs: {total:g} steps x {BIT_BATCH} images / {n:,} = {total * BIT_BATCH / n:.2f} passes,"
        f" rounded up to {epochs} epochs ({images_seen:,} images, {keel_steps} steps of <= {batch})",
        f"  schedule: warm-up {warmup_epochs:.3g} epochs, lr x 0.1 at "
        f"{', '.join(f'{m:.3g}' for m in milestones)} of training (step schedule)",
    ])
    return cfg, explanation
