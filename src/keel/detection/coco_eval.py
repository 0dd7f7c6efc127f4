"""COCO detection metrics through pycocotools, and torchvision detector outputs as COCO results.

``evaluate_coco`` hands the work to pycocotools' ``COCOeval`` (the reference evaluator; AP is
not reimplemented here) and reads its results the way detectron2's ``COCOEvaluator`` does:

* AP, AP50, AP75, APs, APm, APl are ``COCOeval.stats[0:6]`` in percent (0-100, detectron2's
  unit); an entry that COCO marks -1 (no ground truth in that area range) is NaN.
* per-class AP is the mean of ``eval["precision"][:, :, k, area=all, maxDets=100]`` over the
  entries > -1, in percent; NaN for a category without ground truth.
* precision-recall curves come from the same array at IoU 0.5 and 0.75 (``iouThrs`` indices 0
  and 5), area "all", 100 detections, over COCO's 101 recall thresholds 0, 0.01, ..., 1. They
  stay in 0-1, like the axes they are drawn on.
* for ``segm``, a result's ``bbox`` is dropped before pycocotools sees it: with a ``bbox`` present
  ``loadRes`` takes the box area as the instance's area, which changes what counts as small,
  medium and large (detectron2 drops it for the same reason).

pycocotools prints while it works; its output is captured and discarded. ``loadRes`` fails on
an empty result list, so no detections at all are evaluated against an empty result set
(AP 0 for every category that has ground truth). Annotation ids are renumbered 1..N on a copy:
COCOeval marks a detection as matched by storing the gt id, so an id of 0 reads as unmatched.
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from keel.data.errors import DataError

__all__ = ["IOU_TYPES", "STAT_NAMES", "evaluate_coco", "predictions_to_coco", "check_detections"]

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PR_IOUS = {"precision@0.5": 0, "precision@0.75": 5}  # indices into COCOeval.params.iouThrs
MASK_THRESHOLD = 0.5


def _check_gt(gt: Mapping, iou_type: str) -> None:
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise DataError(f"COCO ground truth: missing the {key!r} list")
    for i, ann in enumerate(gt["annotations"]):
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise DataError(f"COCO ground truth: annotation {i} has no {key!r}")
        if iou_type == "segm" and not ann.get("segmentation"):
            raise DataError(f"COCO ground truth: annotation {i} has no 'segmentation' (needed for segm)")


def check_detections(gt: Mapping, detections: Sequence[Mapping], iou_type: str = "bbox") -> None:
    """One-line DataError for the first detection that cannot be evaluated against ``gt``."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    _check_gt(gt, iou_type)
    images = {img["id"] for img in gt["images"]}
    categories = {cat["id"] for cat in gt["categories"]}
    shape_key = "bbox" if iou_type == "bbox" else "segmentation"
    for i, det in enumerate(detections):
        for key in ("image_id", "category_id", "score", shape_key):
            if key not in det:
                raise DataError(f"detection {i}: missing {key!r}")
        if det["image_id"] not in images:
            raise DataError(f"detection {i}: image_id {det['image_id']!r} is not an image of the ground truth")
        if det["category_id"] not in categories:
            raise DataError(f"detection {i}: category_id {det['category_id']!r} is not a ground-truth category")
        if iou_type == "bbox" and (len(det["bbox"]) != 4 or min(det["bbox"][2:]) < 0):
            raise DataError(f"detection {i}: bbox must be [x, y, w, h] with w, h >= 0, got {det['bbox']!r}")


def _gt_api(gt: Mapping) -> COCO:
    anns = []
    for i, ann in enumerate(gt["annotations"]):
        ann = dict(ann, id=i + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
        anns.append(ann)
    api = COCO()
    api.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]), "annotations": anns}
    api.createIndex()
    return api


def _results_api(gt_api: COCO, detections: Sequence[Mapping], iou_type: str) -> COCO:
    # Copies: loadRes writes id, area and segmentation into the dicts it is given.
    results = [dict(d) for d in detections]
    if iou_type == "segm":
        for d in results:
            d.pop("bbox", None)
    if results:
        return gt_api.loadRes(results)
    empty = COCO()
    empty.dataset = {"images": list(gt_api.dataset["images"]),
                     "categories": list(gt_api.dataset["categories"]), "annotations": []}
    empty.createIndex()
    return empty


def _percent(value: float) -> float:
    return float(value) * 100 if value >= 0 else math.nan


def _class_results(ev: COCOeval, names: Mapping[int, str]) -> tuple[dict, dict]:
    precision = ev.eval["precision"]  # (T iou, R recall, K class, A area, M maxDets)
    recall = [float(r) for r in ev.params.recThrs]
    per_class, curves = {}, {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        name = names[cat_id]
        per_class[name] = float(valid.mean()) * 100 if valid.size else math.nan
        if valid.size:
            curves[name] = {"recall": list(recall)} | {
                key: [float(v) for v in precision[t, :, k, 0, -1]] for key, t in PR_IOUS.items()}
    return per_class, curves


def evaluate_coco(gt: Mapping, detections: Sequence[Mapping], iou_type: str = "bbox") -> dict:
    """COCO AP of ``detections`` (COCO result entries) against ``gt`` (a COCO JSON dict).

    Returns AP, AP50, AP75, APs, APm, APl (percent, NaN where COCO has no ground truth),
    ``per_class`` {category name: AP in percent} and ``pr_curves`` {category name: {"recall",
    "precision@0.5", "precision@0.75"}: 101 values in 0-1} for the categories with ground truth.
    """
    check_detections(gt, detections, iou_type)
    names = {cat["id"]: str(cat.get("name", cat["id"])) for cat in gt["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt_api = _gt_api(gt)
        ev = COCOeval(gt_api, _results_api(gt_api, detections, iou_type), iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {name: _percent(v) for name, v in zip(STAT_NAMES, ev.stats)}
    out["per_class"], out["pr_curves"] = _class_results(ev, names)
    return out


def _category_of(label: int, category_ids: Sequence[int] | None) -> int:
    if category_ids is None:
        return label
    if not 1 <= label <= len(category_ids):
        raise DataError(f"predictions_to_coco: label {label} has no category (labels run 1..{len(category_ids)})")
    return int(category_ids[label - 1])


def _mask_rles(masks: torch.Tensor, threshold: float) -> list[dict]:
    binary = (masks[:, 0] > threshold).to(torch.uint8).cpu().numpy()  # (N, H, W)
    # pycocotools wants one Fortran-ordered (H, W, N) array.
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
    return rles


def predictions_to_coco(outputs: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                        category_ids: Sequence[int] | None = None,
                        mask_threshold: float = MASK_THRESHOLD) -> list[dict]:
    """torchvision detector outputs (one dict per image: ``boxes`` (N, 4) xyxy, ``scores``,
    ``labels``, optional ``masks`` (N, 1, H, W) probabilities) as COCO result entries.

    ``category_ids[l - 1]`` is the COCO category of label ``l`` (torchvision's label 0 is the
    background); without it a label is its category id. Masks become RLE (counts as str) after
    thresholding at ``mask_threshold``.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"predictions_to_coco: {len(outputs)} outputs but {len(image_ids)} image_ids")
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = box_convert(out["boxes"].detach().double().cpu(), "xyxy", "xywh").tolist()
        scores = out["scores"].detach().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        rles = _mask_rles(out["masks"].detach(), mask_threshold) if "masks" in out and len(boxes) else None
        for i, (box, score, label) in enumerate(zip(boxes, scores, labels)):
            entry = {"image_id": int(image_id), "category_id": _category_of(int(label), category_ids),
                     "bbox": [float(v) for v in box], "score": float(score)}
            if rles is not None:
                entry["segmentation"] = rles[i]
            results.append(entry)
    return results
