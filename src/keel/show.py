"""Pictures people would rather look at than read: training curves (more to come: MAE
reconstructions, attention maps, neighbour grids)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(history: dict, path: str | Path, title: str = "") -> Path:
    """Loss per step and, when monitored, kNN top-1 per epoch, side by side."""
    has_knn = bool(history.get("knn"))
    fig, axes = plt.subplots(1, 2 if has_knn else 1, figsize=(10 if has_knn else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    if history.get("loss"):
        steps, losses = zip(*history["loss"])
        ax.plot(steps, losses, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    if has_knn:
        ax = axes[0][1]
        epochs, accs = zip(*history["knn"])
        ax.plot(epochs, accs, marker="o", color="tab:green")
        ax.set_xlabel("epoch")
        ax.set_ylabel("kNN top-1 (%)")
        ax.set_title("kNN monitor")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_comparison(rows: dict[str, dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per metric, one bar per backbone (e.g. pretrained vs random)."""
    names = list(rows)
    metrics = list(next(iter(rows.values())))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(metrics), 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [m + (i - (len(names) - 1) / 2) * width for m in range(len(metrics))]
        vals = [rows[name][k] for k in metrics]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
