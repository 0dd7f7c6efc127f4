"""TIDE's error breakdown of box detections: what each false positive and missed object costs in AP.

Bolya et al. 2020, "TIDE: A General Toolbox for Identifying Object Detection Errors", with the
rules of its reference implementation (tidecv 1.0.1), against which the tests check this file.

Matching, per image, over its ``max_dets`` (100) highest-scored detections of all classes in
score order: a detection takes the unmatched ground truth of its class with the highest IoU if
that IoU >= the foreground threshold t_f = 0.5 (a true positive). A detection that misses and
covers a crowd region of its class (intersection over the detection's area > t_f) is ignored:
neither positive nor error. Every other detection gets the first error that fits, in this order
(IoU_same: best IoU with a gt of its class, IoU_other: with a gt of another class):

==========  =========================================================  =======================
error       rule                                                       fix (the oracle)
==========  =========================================================  =======================
Loc         t_b <= IoU_same <= t_f (t_b = 0.1)                         becomes a true positive
Cls         IoU_other >= t_f                                           true positive of the gt's class
Dupe        IoU >= t_f with a gt of its class matched by a higher one  suppressed
Bkg         IoU <= t_b with every gt (or the image has none)           suppressed
Both        anything else (wrong class, t_b < IoU < t_f)               suppressed
Miss        a gt left unmatched that no Loc/Cls error points at        removed from the gt count
==========  =========================================================  =======================

A Loc or Cls error is fixed only if its gt is unmatched and it is that gt's highest-scored
Loc/Cls error; the others on the same gt are suppressed (one detection per object). Each dAP is
AP after fixing that one kind minus AP as is, clamped at 0 as TIDE does (a negative value only
comes from the 101-point binning). The two special errors fix every false positive (FP: all true
positives scored above all false ones) or every false negative (FN: unmatched gts removed from
the count) and are not clamped.

AP is TIDE's, not COCOeval's: per class, the precision envelope read at recalls 0, 0.01, ..., 1
(i / 100, searched as COCO does), averaged over the classes that have a ground truth or a
detection; a class with detections but no ground truth counts with AP 0 (COCO leaves it out).
Equal scores keep image order, then per-image score order (a stable sort; tidecv's order of
ties differs between its runs, so tests use distinct scores). IoU is box IoU on xywh boxes.
Deviation: tidecv also classifies crowd-ignored detections and may fix them into positives; here
an ignored detection is never an error.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

from keel.detection.coco_eval import check_detections

__all__ = ["ERROR_TYPES", "ERROR_NAMES", "error_breakdown"]

FG_THRESHOLD = 0.5
BG_THRESHOLD = 0.1
MAX_DETS = 100
ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
ERROR_NAMES = {"cls": "classification", "loc": "localisation", "both": "cls + loc",
               "dupe": "duplicate", "bkg": "background", "miss": "missed gt"}
TP = -1  # a true positive's "error" code in the points table
_CLS, _LOC, _BOTH, _DUPE, _BKG = (ERROR_TYPES.index(k) for k in ("cls", "loc", "both", "dupe", "bkg"))
POINT_KEYS = ("cls", "score", "error", "fix_cls")  # one row per kept detection (a point of the PR curve)
GT_KEYS = ("gt_cls", "gt_matched", "gt_usable")    # one row per non-crowd gt; usable: a Loc/Cls error points at it


def _boxes(items: Sequence[Mapping]) -> torch.Tensor:
    xywh = torch.tensor([list(map(float, x["bbox"])) for x in items], dtype=torch.float64).reshape(-1, 4)
    return box_convert(xywh, "xywh", "xyxy")


def _crowd_covered(dets: torch.Tensor, det_cls: np.ndarray, crowd: Sequence[Mapping]) -> np.ndarray:
    """Whether each detection lies in a crowd region of its class (intersection / its own area)."""
    if not crowd:
        return np.zeros(len(det_cls), bool)
    regions = _boxes(crowd)
    lt = torch.maximum(dets[:, None, :2], regions[None, :, :2])
    rb = torch.minimum(dets[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = ((dets[:, 2:] - dets[:, :2]).prod(-1)).clamp(min=1e-12)
    same = det_cls[:, None] == np.array([c["category_id"] for c in crowd])[None, :]
    return (((inter / area[:, None]).numpy() > FG_THRESHOLD) & same).any(1)


def _match(iou_same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching in score order; (detection is a TP, gt is matched). A loop over the
    detections: each one's choice depends on the gts taken before it."""
    buffer = iou_same.copy()
    tp = np.zeros(buffer.shape[0], bool)
    used = np.zeros(buffer.shape[1], bool)
    for i in range(buffer.shape[0]):
        j = int(buffer[i].argmax())
        if buffer[i, j] >= FG_THRESHOLD:
            tp[i], used[j] = True, True
            buffer[:, j] = 0  # a matched gt cannot be taken again
    return tp, used


def _classify(iou: np.ndarray, same: np.ndarray, used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TIDE's error type of each detection (first rule that fits) and the gt a Loc/Cls points at."""
    iou_same, iou_other = iou * same, iou * ~same
    best_same, best_other = iou_same.argmax(1), iou_other.argmax(1)
    rows = np.arange(len(iou))
    m_same, m_other = iou_same[rows, best_same], iou_other[rows, best_other]
    m_used = (iou_same * used[None, :]).max(1)
    kind = np.select(
        [(BG_THRESHOLD <= m_same) & (m_same <= FG_THRESHOLD), m_other >= FG_THRESHOLD,
         m_used >= FG_THRESHOLD, iou.max(1) <= BG_THRESHOLD],
        [_LOC, _CLS, _DUPE, _BKG], default=_BOTH)
    target = np.where(kind == _LOC, best_same, np.where(kind == _CLS, best_other, -1))
    return kind, target


def _image_rows(dets: list[Mapping], gts: list[Mapping], crowd: list[Mapping]) -> dict[str, np.ndarray]:
    """The points and gt rows of one image; ``dets`` in score order."""
    det_cls = np.array([d["category_id"] for d in dets], dtype=np.int64)
    gt_cls = np.array([g["category_id"] for g in gts], dtype=np.int64)
    tp, used = np.zeros(len(dets), bool), np.zeros(len(gts), bool)
    kind, target = np.full(len(dets), _BKG), np.full(len(dets), -1)  # no gt: all background
    usable, fix_cls = np.zeros(len(gts), bool), np.full(len(dets), -1)
    ignored = np.zeros(len(dets), bool)
    if dets:
        det_boxes = _boxes(dets)
        if gts:
            iou = box_iou(det_boxes, _boxes(gts)).numpy()
            same = det_cls[:, None] == gt_cls[None, :]
            tp, used = _match(iou * same)
            kind, target = _classify(iou, same, used)
        ignored = ~tp & _crowd_covered(det_boxes, det_cls, crowd)
        fixable = ~tp & ~ignored & (target >= 0)
        fixable[fixable] = ~used[target[fixable]]
        usable[target[fixable]] = True
        # Of the errors that could fix one gt, only the first in score order does.
        _, first = np.unique(target[fixable], return_index=True)
        keep = np.flatnonzero(fixable)[first]
        fix_cls[keep] = gt_cls[target[keep]]
    kept = ~ignored
    scores = np.array([float(d["score"]) for d in dets], dtype=np.float64)
    return {"cls": det_cls[kept], "score": scores[kept], "error": np.where(tp, TP, kind)[kept],
            "fix_cls": fix_cls[kept], "gt_cls": gt_cls, "gt_matched": used, "gt_usable": usable}


def _build_table(gt: Mapping, detections: Sequence[Mapping], max_dets: int) -> dict[str, np.ndarray]:
    by_image: dict = {img["id"]: ([], [], []) for img in gt["images"]}
    for d in detections:
        by_image[d["image_id"]][0].append(d)
    for ann in gt["annotations"]:
        by_image[ann["image_id"]][2 if ann.get("iscrowd", 0) else 1].append(ann)
    rows = []
    for dets, gts, crowd in by_image.values():
        # TIDE keeps the max_dets best of an image over all classes (COCO: per class).
        order = sorted(range(len(dets)), key=lambda i: -float(dets[i]["score"]))[:max_dets]
        rows.append(_image_rows([dets[i] for i in order], gts, crowd))
    empty = _image_rows([], [], [])
    return {k: np.concatenate([empty[k]] + [r[k] for r in rows]) for k in POINT_KEYS + GT_KEYS}


def _ap(score: np.ndarray, tp: np.ndarray, npos: int) -> float:
    """TIDE's (and COCO's) 101-point interpolated AP of one class, in percent."""
    if npos == 0 or len(score) == 0:
        return 0.0
    hits = tp[np.argsort(-score, kind="stable")]
    ctp = np.cumsum(hits)
    precision = ctp / np.arange(1, len(hits) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(ctp / npos, np.arange(101) / 100, side="left")
    return float(np.where(idx < len(hits), envelope[np.minimum(idx, len(hits) - 1)], 0.0).mean() * 100)


def _mean_ap(cls: np.ndarray, score: np.ndarray, tp: np.ndarray, npos: Mapping[int, int]) -> float:
    """Mean over the classes with a point or a gt: TIDE's ``is_empty`` rule."""
    classes = set(cls.tolist()) | {c for c, n in npos.items() if n > 0}
    if not classes:
        return 0.0
    return float(np.mean([_ap(score[cls == c], tp[cls == c], npos.get(c, 0)) for c in classes]))


def _fixed_ap(t: dict, npos: Counter, kind: str) -> float:
    """AP with every error of one ``kind`` fixed by TIDE's oracle (see the module's table)."""
    cls, score, err = t["cls"], t["score"], t["error"]
    if kind == "miss":
        missed = Counter(t["gt_cls"][~t["gt_matched"] & ~t["gt_usable"]].tolist())
        return _mean_ap(cls, score, err == TP, npos - missed)
    code = ERROR_TYPES.index(kind)
    hit = err == code
    if kind in ("cls", "loc"):
        fixed = hit & (t["fix_cls"] >= 0)
        keep = ~hit | fixed
        new_cls = np.where(fixed, t["fix_cls"], cls)
        return _mean_ap(new_cls[keep], score[keep], (err == TP)[keep] | fixed[keep], npos)
    return _mean_ap(cls[~hit], score[~hit], err[~hit] == TP, npos)


def error_breakdown(gt_coco: Mapping, detections: Sequence[Mapping], max_dets: int = MAX_DETS) -> dict:
    """TIDE's main errors of box ``detections`` (COCO result entries) against ``gt_coco``.

    Returns ``AP50`` (TIDE's AP at IoU 0.5, percent), ``counts`` and ``dAP`` keyed by
    ERROR_TYPES (AP points gained by fixing that kind alone), and ``special_dAP`` with
    ``false_positive`` and ``false_negative``.
    """
    check_detections(gt_coco, detections, "bbox")
    t = _build_table(gt_coco, detections, max_dets)
    npos = Counter(t["gt_cls"].tolist())
    tp = t["error"] == TP
    base = _mean_ap(t["cls"], t["score"], tp, npos)
    counts = {k: int((t["error"] == ERROR_TYPES.index(k)).sum()) for k in ERROR_TYPES[:-1]}
    counts["miss"] = int((~t["gt_matched"] & ~t["gt_usable"]).sum())
    dap = {k: max(_fixed_ap(t, npos, k) - base, 0.0) for k in ERROR_TYPES}
    unmatched = Counter(t["gt_cls"][~t["gt_matched"]].tolist())
    special = {
        # FP: every true positive scored above every false one; FN: no unmatched gt counted.
        "false_positive": _mean_ap(t["cls"], tp.astype(np.float64), tp, npos) - base,
        "false_negative": _mean_ap(t["cls"], t["score"], tp, npos - unmatched) - base,
    }
    return {"AP50": base, "counts": counts, "dAP": dap, "special_dAP": special}
