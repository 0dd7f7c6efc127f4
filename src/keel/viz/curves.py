"""Numbers over time and side by side: a run's training curves, a comparison of backbones."""
from __future__ import annotations

import textwrap
from pathlib import Path

from keel.viz import plt


def plot_run(history: dict, path: str | Path, title: str = "", main_metric: str | None = None) -> Path:
    """Training loss per step and, beside it, what was measured per epoch: the kNN monitor of a
    pretraining run, or the test split's ``main_metric`` of a fine-tuning run (and its EMA's)."""
    panels = []
    if history.get("knn"):
        epochs, accs = zip(*history["knn"])
        panels.append((history.get("knn_about", "kNN monitor"), "kNN top-1 (%)", [("kNN", epochs, accs, "tab:green")]))
    if main_metric:
        lines = []
        for key, color in ((main_metric, "tab:green"), (f"ema_{main_metric}", "tab:orange")):
            evald = [h for h in history.get("eval", []) if key in h]
            if evald:
                lines.append((key, [h["epoch"] for h in evald], [h[key] for h in evald], color))
        if lines:
            panels.append((f"test {main_metric}", main_metric, lines))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5 + 5 * len(panels), 3.6), squeeze=False)
    ax = axes[0][0]
    if history.get("loss"):
        steps, losses = zip(*history["loss"])
        ax.plot(steps, losses, color="tab:blue")
    ax.set(xlabel="step", ylabel="training loss", title="loss")
    ax.grid(alpha=0.3)
    for ax, (name, ylabel, lines) in zip(axes[0][1:], panels):
        for label, xs, ys, color in lines:
            ax.plot(xs, ys, marker="o", color=color, label=label)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.set_title(textwrap.fill(name, 48), fontsize=9 if len(name) > 40 else None)
        if len(lines) > 1:
            ax.legend(fontsize=8)
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

