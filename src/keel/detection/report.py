"""A trained detector's report on a test set: COCO AP (box, and mask for Mask R-CNN), per-class
AP, TIDE's error breakdown and the pictures, written to one folder.

Files: ``metrics.json`` (everything), ``ap.md`` (the AP table and the error breakdown as markdown
tables), ``errors.png`` (dAP per error kind), ``pr.png`` (precision-recall per class at IoU 0.5
and 0.75) and ``detections.json`` (the COCO result entries, for any other COCO tool).
"""
from __future__ import annotations

import json
from pathlib import Path

from keel.detection.coco_eval import evaluate_coco
from keel.detection.errors import ERROR_NAMES, error_breakdown
from keel.detection.plots import plot_error_breakdown, plot_pr_curves

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _cell(v: float) -> str:
    return "—" if v != v else f"{v:.1f}"    # NaN: no ground truth of that size


def markdown(box: dict, errors: dict, segm: dict | None = None) -> str:
    lines = ["| | " + " | ".join(AP_KEYS) + " |", "|---" * (len(AP_KEYS) + 1) + "|",
             "| box | " + " | ".join(_cell(box[k]) for k in AP_KEYS) + " |"]
    if segm is not None:
        lines.append("| mask | " + " | ".join(_cell(segm[k]) for k in AP_KEYS) + " |")
    lines += ["", "| class | box AP |", "|---|---|"] + [f"| {n} | {_cell(v)} |" for n, v in box["per_class"].items()]
    lines += ["", f"TIDE error breakdown (AP50 {errors['AP50']:.1f}; dAP = AP50 points gained by fixing that kind):", "",
              "| error | count | dAP |", "|---|---|---|"]
    lines += [f"| {ERROR_NAMES[k]} | {errors['counts'][k]} | {errors['dAP'][k]:.2f} |" for k in errors["dAP"]]
    return "\n".join(lines) + "\n"


def write_report(task, data, out_dir: str | Path, masks: bool = False, model=None, title: str = "") -> dict:
    """Evaluate ``task``'s detector on ``data`` and write the report; returns the metrics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, bad = task.detections(data, model)
    gt = data.coco()
    box = evaluate_coco(gt, results, "bbox")
    errors = error_breakdown(gt, results)
    segm = evaluate_coco(gt, results, "segm") if masks else None
    metrics = {**{k: box[k] for k in AP_KEYS}, "per_class": box["per_class"], "errors": errors,
               "images": len(data), "undecodable_images": bad, "detections": len(results)}
    if segm is not None:
        metrics["mask"] = {k: segm[k] for k in AP_KEYS}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "detections.json").write_text(json.dumps(results) + "\n")
    (out / "ap.md").write_text(markdown(box, errors, segm))
    name = title or f"{len(data)} test images"
    plot_error_breakdown(errors, out / "errors.png", f"{name}: TIDE errors, AP50 {errors['AP50']:.1f}")
    plot_pr_curves(box["pr_curves"], out / "pr.png", f"{name}: box AP {box['AP']:.1f}")
    return metrics
