"""Cutting large images (aerial scenes of 2,000+ px) into overlapping tiles and merging the
detections of the tiles back into one set per image.

- :func:`tile_grid`: windows ``tile`` px wide stepping by ``tile - overlap``; the last window of
  a row or column is moved back to lie flush with the border (so it may overlap its neighbour
  by more), and an image smaller than ``tile`` is one window of its own size.
- :func:`tile_records`: one :class:`~keel.detection.annotations.Record` per window, pointing at
  the source image with a ``crop`` that :class:`DetectionDataset` cuts at load time. A box is kept
  when at least ``min_visible`` of its area lies in the window, clipped to it (deepforest's
  ``split_raster`` keeps partially visible boxes the same way); masks are cropped alongside.
- :func:`merge_tile_predictions`: boxes shifted back to image pixels, then a box cut by an inner
  tile border is dropped when a larger box of its class covers most of it (SAHI's
  intersection-over-smaller idea, restricted to cut boxes), then class-wise NMS
  (``torchvision.ops.batched_nms``). Choose ``overlap`` at least the largest object's size: each
  object then lies whole in some tile, and its cut copies on the other tiles are the ones dropped.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms, box_area

from keel.detection.annotations import Record, Window
from keel.detection.dataset import _decode_one, _mask_utils

__all__ = ["tile_grid", "tile_records", "merge_tile_predictions"]


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]  # the last window flush with the border


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[Window]:
    """Windows ``(x0, y0, x1, y1)`` covering a ``width`` x ``height`` image, row by row."""
    for name, value in (("width", width), ("height", height), ("tile", tile)):
        if int(value) != value or value < 1:
            raise ValueError(f"tile_grid: {name} must be a positive integer, got {value!r}")
    if int(overlap) != overlap or not 0 <= overlap < tile:
        raise ValueError(f"tile_grid: overlap must be an integer in [0, tile={tile}), got {overlap!r}")
    step = tile - overlap
    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in _starts(height, tile, step) for x in _starts(width, tile, step)]


def _intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection areas of two XYXY box sets, (len(a), len(b))."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    return (rb - lt).clamp(min=0).prod(dim=2)


class _MaskCache:
    """Full-image masks of one record, decoded once however many tiles need them."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.full: dict[int, np.ndarray] = {}

    def tile_rle(self, j: int, window: Window) -> dict | None:
        seg = self.record.masks[j] if self.record.masks is not None else None
        if seg is None:
            return None  # stays box-shaped: the clipped box is the fallback mask
        if j not in self.full:
            self.full[j] = _decode_one(seg, self.record.boxes[j], self.record.height, self.record.width)
        x0, y0, x1, y1 = window
        rle = _mask_utils().encode(np.asfortranarray(self.full[j][y0:y1, x0:x1]))
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _tile_one(record: Record, window: Window, min_visible: float, masks: _MaskCache) -> Record:
    x0, y0, x1, y1 = window
    win = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)
    area = box_area(record.boxes)
    visible = _intersection(record.boxes, win)[:, 0]
    keep = torch.nonzero((visible > 0) & (visible >= min_visible * area)).flatten()
    offset = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    boxes = torch.minimum(torch.maximum(record.boxes[keep], win[:, [0, 1, 0, 1]]), win[:, [2, 3, 2, 3]]) - offset
    seg = [masks.tile_rle(j, window) for j in keep.tolist()] if record.masks is not None else None
    cx, cy = record.crop[:2] if record.crop is not None else (0, 0)
    return Record(record.image_path, x1 - x0, y1 - y0, boxes, record.labels[keep], seg,
                  record.iscrowd[keep], crop=(cx + x0, cy + y0, cx + x1, cy + y1))


def tile_records(records: Sequence[Record], tile: int, overlap: int, min_visible: float = 0.5,
                 keep_empty: bool = True) -> list[Record]:
    """One record per tile of every record's image (image ids renumbered from 1).

    Boxes are in tile pixels; ``keep_empty=False`` leaves out tiles without a box (aerial scenes
    are mostly empty, and all-background tiles would otherwise dominate training).
    """
    if not 0.0 <= min_visible <= 1.0:
        raise ValueError(f"tile_records: min_visible must be in [0, 1], got {min_visible!r}")
    out: list[Record] = []
    for record in records:
        masks = _MaskCache(record)
        for window in tile_grid(record.width, record.height, tile, overlap):
            piece = _tile_one(record, window, min_visible, masks)
            if keep_empty or len(piece.boxes):
                piece.image_id = len(out) + 1
                out.append(piece)
    return out


def _cut_by_inner_border(boxes: torch.Tensor, window: Window, extent: Window, border: float) -> torch.Tensor:
    """Which boxes reach (within ``border`` px) an edge of their tile that is not the image's."""
    x0, y0, x1, y1 = window
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    if x0 > extent[0]:
        cut |= boxes[:, 0] <= x0 + border
    if y0 > extent[1]:
        cut |= boxes[:, 1] <= y0 + border
    if x1 < extent[2]:
        cut |= boxes[:, 2] >= x1 - border
    if y1 < extent[3]:
        cut |= boxes[:, 3] >= y1 - border
    return cut


def _covered(boxes: torch.Tensor, labels: torch.Tensor, cut: torch.Tensor, contain: float) -> torch.Tensor:
    """Cut boxes of which a strictly larger box of the same class covers ``contain`` or more."""
    drop = torch.zeros(len(boxes), dtype=torch.bool)
    idx = torch.nonzero(cut).flatten()
    if len(idx) == 0:
        return drop
    area = box_area(boxes)
    over_smaller = _intersection(boxes[idx], boxes) / area[idx, None].clamp(min=1e-6)
    fuller = (labels[idx, None] == labels[None, :]) & (area[None, :] > area[idx, None]) & (over_smaller >= contain)
    drop[idx] = fuller.any(dim=1)
    return drop


def merge_tile_predictions(preds_per_tile: Sequence[Mapping[str, torch.Tensor]], windows: Sequence[Window],
                           iou: float = 0.5, border: float = 2.0,
                           contain: float = 0.8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detections per tile (``boxes`` in tile pixels, ``scores``, ``labels``) -> one set in image
    pixels ``(boxes, scores, labels)``, sorted by decreasing score."""
    if len(preds_per_tile) != len(windows):
        raise ValueError(f"merge_tile_predictions: {len(preds_per_tile)} predictions for {len(windows)} windows")
    if not windows:
        return torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    extent = (min(w[0] for w in windows), min(w[1] for w in windows),
              max(w[2] for w in windows), max(w[3] for w in windows))
    boxes, scores, labels, cut = [], [], [], []
    for pred, window in zip(preds_per_tile, windows):
        b = pred["boxes"].detach().float().cpu().reshape(-1, 4)
        b = b + torch.tensor([window[0], window[1], window[0], window[1]], dtype=torch.float32)
        boxes.append(b)
        scores.append(pred["scores"].detach().float().cpu().reshape(-1))
        labels.append(pred["labels"].detach().cpu().reshape(-1).to(torch.int64))
        cut.append(_cut_by_inner_border(b, window, extent, border))
    all_boxes, all_scores, all_labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = ~_covered(all_boxes, all_labels, torch.cat(cut), contain)
    all_boxes, all_scores, all_labels = all_boxes[keep], all_scores[keep], all_labels[keep]
    order = batched_nms(all_boxes, all_scores, all_labels, iou)
    lo = torch.tensor([extent[0], extent[1]] * 2, dtype=torch.float32)
    hi = torch.tensor([extent[2], extent[3]] * 2, dtype=torch.float32)
    merged = torch.minimum(torch.maximum(all_boxes[order], lo), hi)
    return merged, all_scores[order], all_labels[order]
