"""Grids of images: nearest neighbours, text-to-image retrieval, attention maps, MAE
reconstructions (``keel show``).

Every grid is laid out in cells of CELL inches at DPI dots per inch, plus a TITLE_BAND for the
title, so a picture's pixel size is known in advance: (columns * CELL * DPI, rows * CELL * DPI +
TITLE_BAND * DPI). No bbox_inches="tight", which would change it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from keel.viz import plt

CELL = 1.25
TITLE_BAND = 0.5
DPI = 100
MAX_HEADS = 6


def grid_figure(rows: int, cols: int, title: str):
    """A figure of rows x cols image cells (axes off) with a title band on top."""
    fig = plt.figure(figsize=(cols * CELL, rows * CELL + TITLE_BAND), dpi=DPI)
    top = rows * CELL / (rows * CELL + TITLE_BAND)
    axes = fig.subplots(rows, cols, squeeze=False,
                        gridspec_kw=dict(left=0.01, right=0.99, bottom=0.01, top=top - 0.02 * top,
                                         wspace=0.08, hspace=0.3))
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9, y=1 - 0.12 * TITLE_BAND / (rows * CELL + TITLE_BAND), wrap=True)
    return fig, axes


def imshow(ax, image) -> None:
    """A (3, H, W) uint8 or [0, 1] float image, as it is (no normalisation), pixels kept sharp."""
    img = image.detach().cpu()
    img = img.float() / 255 if img.dtype == torch.uint8 else img.float().clamp(0, 1)
    ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _label_text(label: int, classes) -> str:
    if label < 0:
        return ""
    return str(classes[label]) if label < len(classes) else str(label)


def plot_neighbors(queries, query_labels, neighbors, neighbor_labels, scores, path, title: str = "",
                   classes=()) -> Path:
    """Row i: query i, then its neighbours (Q, k, 3, H, W) with their label and cosine similarity
    above; the label in green when it is the query's, red when not (labels < 0: unknown)."""
    q, k = neighbors.shape[:2]
    fig, axes = grid_figure(q, k + 1, title)
    for i in range(q):
        qlab = int(query_labels[i])
        imshow(axes[i][0], queries[i])
        axes[i][0].set_title(f"query {_label_text(qlab, classes)}".strip(), fontsize=8, fontweight="bold")
        for j in range(k):
            ax = axes[i][j + 1]
            imshow(ax, neighbors[i, j])
            nlab = int(neighbor_labels[i, j])
            text = f"{_label_text(nlab, classes)}  {float(scores[i, j]):.2f}".strip()
            color = "black" if qlab < 0 or nlab < 0 else ("green" if nlab == qlab else "red")
            ax.set_title(text, fontsize=8, color=color)
    return save_figure(fig, path)


def plot_retrieval(queries, images, labels, scores, path, title: str = "", classes=()) -> Path:
    """Row i: text query i (wrapped, in the first cell), then its top images (Q, k, 3, H, W) with
    their label (when known) and cosine similarity above."""
    import textwrap
    q, k = images.shape[:2]
    fig, axes = grid_figure(q, k + 1, title)
    for i in range(q):
        axes[i][0].text(0.5, 0.5, textwrap.fill(f'"{queries[i]}"', 18), ha="center", va="center", fontsize=8,
                        fontweight="bold", transform=axes[i][0].transAxes)
        for j in range(k):
            imshow(axes[i][j + 1], images[i, j])
            text = f"{_label_text(int(labels[i, j]), classes)}  {float(scores[i, j]):.2f}".strip()
            axes[i][j + 1].set_title(text, fontsize=8)
    return save_figure(fig, path)


def plot_attention(images, maps, path, title: str = "", max_heads: int = MAX_HEADS) -> Path:
    """Row i: image i, the mean of its heads' maps, then each head (the first ``max_heads``)."""
    b, heads = maps.shape[:2]
    shown = min(heads, max_heads)
    fig, axes = grid_figure(b, 2 + shown, title)
    for i in range(b):
        imshow(axes[i][0], images[i])
        panels = [(f"mean of {heads} heads", maps[i].mean(0))] + [(f"head {h}", maps[i, h]) for h in range(shown)]
        for j, (label, m) in enumerate(panels, start=1):
            axes[i][j].imshow(m.numpy(), cmap="inferno", interpolation="nearest")
            if i == 0:
                axes[i][j].set_title(label, fontsize=8)
        if i == 0:
            axes[i][0].set_title("image", fontsize=8)
    return save_figure(fig, path)


def plot_mae(pictures: dict, path, title: str = "") -> Path:
    """Three rows (original, masked, reconstruction), one column per image."""
    rows = ("original", "masked", "reconstruction")
    b = len(pictures["original"])
    fig, axes = grid_figure(len(rows), b, title)
    for r, key in enumerate(rows):
        for j in range(b):
            imshow(axes[r][j], pictures[key][j])
        axes[r][0].set_title(key, fontsize=8, loc="left")
    return save_figure(fig, path)
