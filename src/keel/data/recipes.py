"""Supervised-recipe augmentations (DeiT's): RandAugment, random erasing, Mixup/CutMix and repeated
augmentation, built on torchvision's transforms (``torchvision.transforms.v2``), not rewritten.
timm is not needed; where torchvision differs from timm (which DeiT uses) it is said below.

* :class:`RandAugment` parses timm's spec strings (``"rand-m9-mstd0.5-inc1"``) and runs
  torchvision's ``RandAugment`` one operation at a time, per image, on uint8 CPU tensors
  (torchvision draws one operation per call, for the whole batch, so a per-image loop is needed
  anyway). timm's parts kept: ``n`` operations per image, each applied with probability ``p``
  (timm's default 0.5), each with its own magnitude drawn from N(m, mstd) and clipped to
  [0, mmax] (timm's ``mstd``). Level m of 10 is m/10 of an operation's maximum, as in timm;
  torchvision quantises magnitudes into bins, here 101 over levels 0..10 (steps of 0.1 level).
  What differs: torchvision's operation list (14, with Identity; timm's "inc1" list has 15, with
  Invert and SolarizeAdd, no Identity) and its strength table (e.g. posterize keeps 8 down to 4
  bits). torchvision's operations already grow with the level (signed enhance factors,
  solarize threshold falling), so ``inc1`` is what they do; ``inc0`` is accepted and ignored.
  Empty areas of geometric operations are filled with the normalisation mean (timm does too).
* :class:`RandomErasing`: torchvision's ``RandomErasing`` per image on the normalised batch,
  with timm's ranges (area 2%..1/3, aspect 0.3..1/0.3, log-uniform) and per-pixel N(0, 1)
  values (timm's ``mode="pixel"``, DeiT's).
* :class:`MixupCutmix`: torchvision's ``MixUp`` / ``CutMix`` (one lambda per batch, timm's
  ``mode="batch"``; CutMix's lambda corrected to the box's clipped area), chosen per batch with
  ``RandomChoice`` (CutMix with probability ``switch_prob`` when both are on). Each image is
  mixed with its neighbour (torchvision pairs image i with i - 1; timm pairs i with B - 1 - i).
  Targets come back as mixed one-hot rows; label smoothing is left to the loss
  (``F.cross_entropy(logits, soft, label_smoothing=eps)``): smoothing the mixed one-hot equals
  mixing smoothed one-hots (timm's ``mixup_target``), since both are linear.
* :func:`repeated_batches`: DeiT's repeated augmentation (its ``RASampler``) in one process:
  an epoch keeps its number of samples, but takes ceil(n / repeats) distinct images, each
  ``repeats`` times in the same batch; every copy gets its own random views. Batches are
  shuffled inside, so Mixup/CutMix rarely pair an image with a copy of itself.

Randomness: every draw comes from the caller's ``torch.Generator``. torchvision's transforms
draw from torch's global CPU generator, so they run inside ``torch.random.fork_rng`` with that
generator seeded from the caller's: reproducible, and the global stream is left as it was.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from keel.data.views import BatchAugment, ViewConfig, normalize

__all__ = ["RandAugmentSpec", "parse_randaugment", "RandAugment", "RandomErasing", "MixupCutmix",
           "repeated_batches", "RecipeAugment", "forked_rng"]

_LEVELS = 10.0         # timm's level scale: level m is m / 10 of an operation's maximum
_BINS_PER_LEVEL = 10   # torchvision bins: 101 over levels 0..10


@contextlib.contextmanager
def forked_rng(generator: torch.Generator | None):
    """Run torchvision's random draws (torch's global CPU generator) from ``generator``: the global
    generator is seeded from it inside, and restored afterwards."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)   # the CPU generator only, CUDA's untouched
        yield


# ---------------------------------------------------------------------------------- RandAugment
@dataclass(frozen=True)
class RandAugmentSpec:
    num_ops: int = 2               # n: operations per image
    magnitude: float = 9.0         # m: level out of 10
    magnitude_std: float = 0.0     # mstd: per-operation Gaussian noise on the level
    magnitude_max: float = 10.0    # mmax: upper clip of the noisy level (at most 10 here)
    prob: float = 0.5              # p: each operation is applied with this probability
    increasing: bool = True        # inc: torchvision's operations always are


def parse_randaugment(spec: str) -> RandAugmentSpec:
    """timm's RandAugment spec, e.g. ``"rand-m9-mstd0.5-inc1"``: ``rand`` then dash-separated
    ``m`` (level), ``n`` (operations), ``mstd``, ``mmax``, ``p``, ``inc``. timm's ``w`` (operation
    weights) is not supported; ``mmax`` above 10 neither (torchvision's tables end at level 10)."""
    parts = spec.strip().split("-")
    if parts[0] != "rand":
        raise ValueError(f"a RandAugment spec starts with 'rand' (e.g. rand-m9-mstd0.5-inc1), got {spec!r}")
    kw: dict = {}
    keys = {"mstd": ("magnitude_std", float), "mmax": ("magnitude_max", float), "inc": ("increasing", int),
            "m": ("magnitude", float), "n": ("num_ops", int), "p": ("prob", float)}
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(-?[0-9.]+)", part)
        if not m:
            raise ValueError(f"unknown part {part!r} in RandAugment spec {spec!r} (known: m, n, mstd, mmax, p, inc)")
        name, cast = keys[m.group(1)]
        try:
            kw[name] = cast(m.group(2))
        except ValueError:
            raise ValueError(f"bad number in {part!r} of RandAugment spec {spec!r}") from None
    out = RandAugmentSpec(**{**kw, "increasing": bool(kw.get("increasing", True))})
    if out.num_ops < 0 or not 0.0 <= out.prob <= 1.0 or out.magnitude_std < 0:
        raise ValueError(f"RandAugment spec {spec!r}: need n >= 0, 0 <= p <= 1, mstd >= 0")
    if not 0.0 <= out.magnitude <= _LEVELS or not 0.0 < out.magnitude_max <= _LEVELS:
        raise ValueError(f"RandAugment spec {spec!r}: m and mmax are levels in [0, 10]")
    return out


class RandAugment:
    """``__call__(images, generator)``: uint8 (B, 3, H, W) on any device -> uint8 on the same
    device, each image through ``num_ops`` torchvision RandAugment operations (see the module
    docstring). Runs on the CPU, image by image: images on a GPU make a round trip."""

    def __init__(self, spec: str | RandAugmentSpec, fill: Sequence[int] = (128, 128, 128)):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import RandAugment as TVRandAugment
        self.spec = parse_randaugment(spec) if isinstance(spec, str) else spec
        bins = int(_LEVELS * _BINS_PER_LEVEL) + 1
        self._op = TVRandAugment(num_ops=1, magnitude=0, num_magnitude_bins=bins,
                                 interpolation=InterpolationMode.BILINEAR, fill=[int(v) for v in fill])

    def levels(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(applied (n, num_ops) bool, level (n, num_ops) float): timm's coin and noisy level."""
        s = self.spec
        applied = torch.rand(n, s.num_ops, generator=generator) < s.prob
        level = torch.full((n, s.num_ops), s.magnitude)
        if s.magnitude_std > 0:
            level = level + s.magnitude_std * torch.randn(n, s.num_ops, generator=generator)
        return applied, level.clamp(0.0, s.magnitude_max)

    def __call__(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"RandAugment takes uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        applied, level = self.levels(len(images), generator)
        bins = (level * _BINS_PER_LEVEL).round().long()
        out = images.cpu().clone()
        with forked_rng(generator):
            for i in range(len(out)):
                img = out[i]
                for k in range(self.spec.num_ops):
                    if applied[i, k]:
                        self._op.magnitude = int(bins[i, k])
                        img = self._op(img)
                out[i] = img
        return out.to(images.device)


# ---------------------------------------------------------------------------------- random erasing
class RandomErasing:
    """``__call__(x, generator)``: each image of a normalised float batch (B, C, H, W) gets, with
    probability ``p``, one box of N(0, 1) noise (torchvision's RandomErasing, timm's ranges)."""

    def __init__(self, p: float, scale: tuple[float, float] = (0.02, 1 / 3),
                 ratio: tuple[float, float] = (0.3, 1 / 0.3)):
        from torchvision.transforms.v2 import RandomErasing as TVRandomErasing
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"random erasing probability must be in [0, 1], got {p}")
        self.p = p
        self._erase = TVRandomErasing(p=p, scale=scale, ratio=ratio, value="random")

    def __call__(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.p == 0:
            return x
        with forked_rng(generator):
            return torch.stack([self._erase(img) for img in x])


# ---------------------------------------------------------------------------------- Mixup / CutMix
class MixupCutmix:
    """``__call__(x, targets, generator) -> (mixed x, soft targets (B, num_classes))`` for a batch
    of images and integer labels: Mixup with Beta(``mixup``, ``mixup``), CutMix with
    Beta(``cutmix``, ``cutmix``) (0 turns either off; both on: CutMix with probability
    ``switch_prob``), torchvision's transforms. Soft targets are the mixed one-hot rows."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, switch_prob: float = 0.5):
        from torchvision.transforms import v2
        if mixup < 0 or cutmix < 0 or not 0.0 <= switch_prob <= 1.0:
            raise ValueError(f"need mixup, cutmix >= 0 and 0 <= switch_prob <= 1, got {mixup}, {cutmix}, {switch_prob}")
        self.num_classes = int(num_classes)
        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        if not choices:
            raise ValueError("MixupCutmix needs mixup > 0 or cutmix > 0")
        self._mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices, p=[1 - switch_prob, switch_prob])

    def __call__(self, x: Tensor, targets: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        with forked_rng(generator):
            return self._mix(x, targets.long())


# ---------------------------------------------------------------------------------- repeated aug
def repeated_batches(n: int, num_batches: int, repeats: int, generator: torch.Generator | None) -> list[Tensor]:
    """One epoch of index batches with repeated augmentation: ceil(n / repeats) distinct images in
    a random order, cut into ``num_batches`` near-equal groups; each group becomes a batch with
    every image ``repeats`` times, shuffled. ``repeats=1`` is a plain shuffled epoch."""
    if repeats < 1 or num_batches < 1:
        raise ValueError(f"repeats and num_batches must be >= 1, got {repeats} and {num_batches}")
    distinct = torch.randperm(n, generator=generator)[:math.ceil(n / repeats)]
    batches = []
    for group in distinct.tensor_split(num_batches):
        if len(group):
            batch = group.repeat_interleave(repeats)
            batches.append(batch[torch.randperm(len(batch), generator=generator)])
    return batches


# ---------------------------------------------------------------------------------- the pipeline
class RecipeAugment:
    """Training views of a supervised recipe, in timm's order: random resized crop + flip (keel's
    batched :class:`BatchAugment`, on the batch's device), RandAugment (uint8, per image, CPU),
    normalisation, random erasing. ``__call__(images_uint8, generator)`` -> normalised float32 on
    the images' device. ``view`` sets the crop, the flip and the normalisation (its colour
    settings are not used). Mixup/CutMix come after, on the batch with its labels."""

    def __init__(self, view: ViewConfig, randaugment: str = "", reprob: float = 0.0):
        from dataclasses import replace
        self.view = view
        # crop and flip only, left in [0, 1]: RandAugment works on uint8 pixels before normalising
        self.crop = BatchAugment(replace(view, jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                                         mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
        fill = [round(255 * m) for m in view.mean]
        self.randaugment = RandAugment(randaugment, fill=fill) if randaugment else None
        self.erasing = RandomErasing(reprob) if reprob > 0 else None

    def __call__(self, images: Tensor, generator: torch.Generator | None, sizes: Tensor | None = None) -> Tensor:
        x = self.crop(images, generator, sizes)
        if self.randaugment is not None:
            x = self.randaugment(x.mul(255).round_().clamp_(0, 255).to(torch.uint8), generator)
        x = normalize(x, self.view.mean, self.view.std)
        if self.erasing is not None:
            x = self.erasing(x, generator)
        return x
