"""Pictures of a detector: PR curves per class, TIDE's error breakdown, boxes drawn on an image.

All go through :mod:`keel.viz` (matplotlib's Agg backend: files only, no display). Inputs are the
dicts of :func:`keel.detection.coco_eval.evaluate_coco` (``pr_curves``) and
:func:`keel.detection.errors.error_breakdown`; boxes are xyxy pixels, as torchvision returns them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from keel.detection.errors import ERROR_NAMES, ERROR_TYPES
from keel.viz import plt
from keel.viz.pictures import DPI, save_figure

MAX_LEGEND = 20  # more classes than this: lines only, a legend would cover the plot
MIN_SIDE = 640   # small images are drawn larger so that labels stay readable


def plot_pr_curves(pr: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """Two panels, IoU 0.5 and 0.75: precision against recall, one line per class
    (``pr`` is ``evaluate_coco(...)["pr_curves"]``)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    colors = plt.get_cmap("tab10" if len(pr) <= 10 else "tab20")  # tab20's pairs look alike
    for ax, key in zip(axes, ("precision@0.5", "precision@0.75")):
        for i, (name, curve) in enumerate(pr.items()):
            precision = np.asarray(curve[key], dtype=float)
            ap = 100 * precision.mean()  # COCO's AP at this IoU: the mean over 101 recalls
            ax.plot(curve["recall"], precision, color=colors(i % colors.N), lw=1.2, label=f"{name} ({ap:.1f})")
        ax.set(xlabel="recall", xlim=(0, 1), ylim=(0, 1.02), title=f"IoU {key.split('@')[1]}")
        ax.grid(alpha=0.3)
        if 0 < len(pr) <= MAX_LEGEND:
            ax.legend(fontsize=7, loc="lower left", title="class (AP)", title_fontsize=7)
    axes[0].set_ylabel("precision")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_error_breakdown(breakdown: Mapping, path: str | Path, title: str = "") -> Path:
    """Bars of dAP (AP50 points gained by fixing each TIDE error kind), the count of each kind
    on its bar; the special FP / FN errors beside them in grey."""
    keys = list(ERROR_TYPES)
    values = [breakdown["dAP"][k] for k in keys]
    labels = [f"{breakdown['counts'][k]}" for k in keys]
    names = [ERROR_NAMES[k] for k in keys]
    colors = ["tab:red", "tab:blue", "tab:purple", "tab:orange", "tab:brown", "tab:olive"]
    special = breakdown.get("special_dAP", {})
    for key, name in (("false_positive", "all FP"), ("false_negative", "all FN")):
        if key in special:
            names.append(name)
            values.append(special[key])
            labels.append("")
            colors.append("tab:gray")
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(names), 3.8))
    bars = ax.bar(range(len(names)), values, color=colors)
    ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("dAP50 (AP points)")
    ax.set_ylim(0, max(max(values, default=0) * 1.15, 1))
    ax.set_title(title or f"TIDE errors, AP50 {breakdown['AP50']:.1f} (bar labels: counts)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _to_hwc(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        img = image.detach().cpu()
        img = img.float() / 255 if img.dtype == torch.uint8 else img.float().clamp(0, 1)
        return img.permute(1, 2, 0).numpy()
    return np.asarray(image.convert("RGB"))  # a PIL image


def _name(label: int, class_names: Sequence[str] | Mapping[int, str]) -> str:
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    # torchvision's labels start at 1 (0 is the background): class_names[0] names label 1.
    return str(class_names[label - 1]) if 1 <= label <= len(class_names) else str(label)


def _rect(ax, box: Sequence[float], color, **kw) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, **kw))


def draw_boxes(image, boxes, labels, scores, class_names: Sequence[str] | Mapping[int, str],
               path: str | Path, gt_boxes=None, gt_labels=None, min_score: float = 0.0) -> Path:
    """``image`` ((3, H, W) uint8 / [0, 1] float tensor, or PIL) with predicted ``boxes`` (xyxy
    pixels) in their class's colour, "name score" above each, and ``gt_boxes`` dashed (in their
    class's colour when ``gt_labels`` are given, else white). The PNG keeps the image's aspect."""
    img = _to_hwc(image)
    h, w = img.shape[:2]
    scale = max(1.0, MIN_SIDE / max(h, w))
    fig = plt.figure(figsize=(w * scale / DPI, h * scale / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    colors = plt.get_cmap("tab10")
    if gt_boxes is not None:
        for i, box in enumerate(torch.as_tensor(gt_boxes).reshape(-1, 4).tolist()):
            color = colors(int(gt_labels[i]) % 10) if gt_labels is not None else "white"
            _rect(ax, box, color, lw=1.5, linestyle="--")
    for box, label, score in zip(torch.as_tensor(boxes).reshape(-1, 4).tolist(),
                                 torch.as_tensor(labels).reshape(-1).tolist(),
                                 torch.as_tensor(scores).reshape(-1).tolist()):
        if score < min_score:
            continue
        color = colors(int(label) % 10)
        _rect(ax, box, color, lw=2)
        ax.text(box[0], box[1], f"{_name(int(label), class_names)} {score:.2f}", fontsize=8, color="white",
                va="bottom", bbox=dict(facecolor=color, alpha=0.8, pad=1, edgecolor="none"))
    ax.set(xlim=(0, w), ylim=(h, 0))
    return save_figure(fig, path)
