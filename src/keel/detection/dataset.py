"""Detection records served to torchvision's detectors (:class:`DetectionDataset`), their
segmentations decoded to masks (pycocotools), and ground truth written back as COCO JSON
(:func:`to_coco`). The conventions are :mod:`keel.detection.annotations`'s.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from keel.data.decode import _pil_to_tensor, load_image
from keel.data.errors import DataError
from keel.detection.annotations import BACKGROUND, Annotations, Record, Segmentation

__all__ = ["decode_masks", "DetectionDataset", "to_coco", "write_coco"]

def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("decoding segmentation masks needs pycocotools (pip install pycocotools)") from exc
    return mask_utils


def _decode_one(seg: Segmentation | None, box: torch.Tensor, height: int, width: int) -> np.ndarray:
    mu = _mask_utils()
    if seg is None:  # no outline given: the box is the best mask there is
        out = np.zeros((height, width), dtype=np.uint8)
        x0, y0, x1, y1 = box.tolist()
        out[int(math.floor(y0)):int(math.ceil(y1)), int(math.floor(x0)):int(math.ceil(x1))] = 1
        return out
    if isinstance(seg, list):
        rle = mu.merge(mu.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mu.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mu.decode(rle)


def decode_masks(record: Record, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The record's segmentations (of the boxes in ``keep``) as a (N, H, W) uint8 tensor."""
    idx = range(len(record.boxes)) if keep is None else torch.nonzero(keep).flatten().tolist()
    segs = record.masks or [None] * len(record.boxes)
    out = [torch.from_numpy(_decode_one(segs[i], record.boxes[i], record.height, record.width)) for i in idx]
    return torch.stack(out) if out else torch.zeros((0, record.height, record.width), dtype=torch.uint8)


class DetectionDataset(Dataset):
    """``(tv_tensors.Image uint8 (3, H, W), target)`` per record, for torchvision detectors.

    ``target`` holds ``boxes`` (BoundingBoxes, XYXY), ``labels``, ``image_id`` and, when
    ``with_masks`` and the source has segmentations, ``masks`` (Mask (N, H, W) uint8).
    ``transforms`` (torchvision.transforms.v2) is called as ``transforms(image, target)``.
    """

    def __init__(self, annotations: Annotations | Sequence[Record], transforms: Callable | None = None,
                 with_masks: bool = False, include_crowd: bool = False) -> None:
        self.records = list(annotations)
        self.classes = getattr(annotations, "classes", None)
        self.transforms = transforms
        self.with_masks = with_masks
        self.include_crowd = include_crowd

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        rec = self.records[i]
        pil = load_image(rec.image_path)
        if rec.crop is not None:
            pil = pil.crop(rec.crop)
        if pil.size != (rec.width, rec.height):
            raise DataError(f"{rec.image_path}: image is {pil.size[0]}x{pil.size[1]} but its annotation "
                            f"says {rec.width}x{rec.height}")
        keep = torch.ones(len(rec.boxes), dtype=torch.bool) if self.include_crowd else rec.iscrowd == 0
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(rec.boxes[keep], format="XYXY", canvas_size=(rec.height, rec.width)),
            "labels": rec.labels[keep],
            "image_id": rec.image_id,
        }
        if self.include_crowd:
            target["iscrowd"] = rec.iscrowd
        if self.with_masks and rec.masks is not None:
            target["masks"] = tv_tensors.Mask(decode_masks(rec, keep))
        image = tv_tensors.Image(_pil_to_tensor(pil))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# ---------------------------------------------------------------------------- writing COCO


def _json_segmentation(seg: Segmentation) -> Segmentation:
    if isinstance(seg, dict) and isinstance(seg["counts"], bytes):
        return {"size": list(seg["size"]), "counts": seg["counts"].decode("ascii")}
    return seg


def to_coco(records: Sequence[Record], classes: Sequence[str],
            images_root: str | os.PathLike | None = None) -> dict:
    """Ground truth as a COCO dict; category id = label, file names relative to ``images_root``."""
    if not classes or classes[0] != BACKGROUND:
        raise DataError(f"to_coco: classes must start with {BACKGROUND!r} (label i names classes[i])")
    images, annotations, seen = [], [], set()
    for rec in records:
        if rec.image_id in seen:
            raise DataError(f"to_coco: image id {rec.image_id} is used by two records ({rec.image_path})")
        seen.add(rec.image_id)
        name = os.path.relpath(rec.image_path, images_root) if images_root is not None else rec.image_path
        images.append({"id": int(rec.image_id), "file_name": name, "width": rec.width, "height": rec.height})
        for j, (box, label) in enumerate(zip(rec.boxes.tolist(), rec.labels.tolist())):
            if not 1 <= label < len(classes):
                raise DataError(f"to_coco: {rec.image_path} has label {label}, outside 1..{len(classes) - 1}")
            x0, y0, x1, y1 = box
            ann = {"id": len(annotations) + 1, "image_id": int(rec.image_id), "category_id": int(label),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                   "iscrowd": int(rec.iscrowd[j])}
            seg = rec.masks[j] if rec.masks is not None else None
            if seg is not None:
                ann["segmentation"] = _json_segmentation(seg)
                # COCO's size ranges (small/medium/large) use the mask area when there is one
                ann["area"] = float(_decode_one(seg, rec.boxes[j], rec.height, rec.width).sum())
            annotations.append(ann)
    categories = [{"id": i, "name": n} for i, n in enumerate(classes) if i > 0]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(path: str | os.PathLike, records: Sequence[Record], classes: Sequence[str],
               images_root: str | os.PathLike | None = None) -> Path:
    """Write :func:`to_coco`'s dict as JSON and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_coco(records, classes, images_root)), encoding="utf-8")
    return path
