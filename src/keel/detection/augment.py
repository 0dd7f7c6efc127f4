"""Large-scale jitter (LSJ), the training views of ViTDet and of Simple Copy-Paste (Ghiasi et al.
2021): resize the image by a random factor in [0.1, 2.0] of the fixed training size, crop or pad it
to that size, flip it. torchvision's transforms v2 move the boxes and masks with the pixels and
drop the boxes that fell out of the crop.

The transforms draw from torch's global generator, which the trainer seeds per step and process
(:class:`keel.engine.trainer.Trainer`), so the views of a resumed run are the ones an unbroken run
makes. Padding is mid-grey (128): after keel's normalisation (mean 0.5) it is zero, what the
backbone sees beyond an image's border in a padded batch.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

PAD = 128


def lsj(img_size: int, scale: tuple[float, float] = (0.1, 2.0), hflip: float = 0.5) -> v2.Compose:
    """The LSJ pipeline for (image, target) pairs: target boxes are ``tv_tensors.BoundingBoxes``,
    masks ``tv_tensors.Mask``; boxes smaller than a pixel after the crop are removed with their
    labels and masks."""
    if not 0 < scale[0] <= scale[1]:
        raise ValueError(f"aug.scale_min/scale_max must satisfy 0 < min <= max, got {scale}")
    return v2.Compose([
        v2.RandomHorizontalFlip(hflip),
        v2.ScaleJitter((img_size, img_size), scale_range=tuple(scale), antialias=True),
        v2.RandomCrop(img_size, pad_if_needed=True, fill={tv_tensors.Image: PAD, "others": 0}),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ])


def as_target(t: dict, canvas: tuple[int, int]) -> dict:
    """A plain target dict (boxes xyxy float, labels, optional masks) as tv_tensors for v2."""
    out = dict(t)
    out["boxes"] = tv_tensors.BoundingBoxes(t["boxes"].float(), format="XYXY", canvas_size=canvas)
    if "masks" in t:
        out["masks"] = tv_tensors.Mask(t["masks"])
    return out


def plain(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """tv_tensors back to plain tensors, as torchvision's detectors take them."""
    target = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
    return image.as_subclass(torch.Tensor), target
