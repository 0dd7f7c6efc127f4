"""Detections on new images: a folder, one image, or a large aerial scene cut into tiles whose
detections are merged across tile borders (:func:`keel.detection.tiles.merge_tile_predictions`).

Writes ``predictions.json`` (COCO format: ``images``, ``categories`` and ``annotations`` holding
the detections, each with its ``score``), one PNG per image with the boxes at or above the drawing
threshold, and ``skipped.txt`` for files that could not be decoded (they are listed, not fatal).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from keel.data.decode import _pil_to_tensor, load_image
from keel.data.errors import BadImageError, DataError
from keel.data.folders import IMAGE_EXTENSIONS
from keel.detection.plots import draw_boxes
from keel.detection.tiles import merge_tile_predictions, tile_grid


def image_paths(source: str | Path) -> list[Path]:
    """One image file, or every image file under a folder (sorted)."""
    p = Path(source)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"--data {source}: no such file or folder")
    paths = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"--data {source}: the folder has no image files ({', '.join(IMAGE_EXTENSIONS[:6])}, ...)")
    return paths


def detect_image(task, image: torch.Tensor, tile: int = 0, overlap: int = 64) -> dict:
    """Detections on one uint8 image (3, H, W); ``tile`` > 0 and an image larger than it: per tile,
    then merged (boxes found twice across a border are kept once)."""
    h, w = image.shape[-2:]
    if not tile or max(h, w) <= tile:
        return task.predict([image])[0]
    windows = tile_grid(w, h, tile, overlap)
    crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in windows]
    boxes, scores, labels = merge_tile_predictions(task.predict(crops), windows)   # predict batches them
    return {"boxes": boxes, "scores": scores, "labels": labels}


def predict(task, source: str | Path, out_dir: str | Path, tile: int = 0, overlap: int = 64,
            draw_thresh: float = 0.5, progress: bool = True) -> dict:
    """Run ``task``'s detector on ``source`` and write the files above into ``out_dir``; returns
    ``{"images", "detections", "skipped", "out"}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = task.classes[1:]
    images, annotations, skipped = [], [], []
    for path in tqdm(image_paths(source), desc="detect", unit="img", disable=not progress):
        try:
            image = _pil_to_tensor(load_image(path))
        except BadImageError as e:
            skipped.append(f"{path}\t{e}")
            continue
        pred = detect_image(task, image, tile, overlap)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": str(path), "height": int(image.shape[1]), "width": int(image.shape[2])})
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "score": float(score), "iscrowd": 0})
        draw_boxes(image, pred["boxes"], pred["labels"], pred["scores"], names,
                   out / f"{image_id:05d}-{path.stem}.png", min_score=draw_thresh)
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    (out / "predictions.json").write_text(json.dumps(coco) + "\n")
    if skipped:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    return {"images": len(images), "detections": len(annotations), "skipped": len(skipped), "out": str(out)}
