"""The suite's report: ``report.md`` and PNGs drawn from the report dict that
:func:`keel.evaluate.suite.run_suite` writes as ``report.json`` (string keys, as JSON has them), so
a report can be drawn again from the file alone::

    write_report(json.loads(Path("suite/report.json").read_text()), "suite")

Per dataset: one table with the checkpoints side by side (best per row in bold), a robustness
table, few-shot curves (``fewshot_<dataset>.png``: shots on x, one line per checkpoint and
protocol, error bars one standard deviation over draws), bars of the headline numbers
(``compare_<dataset>.png``) and of robustness (``robustness_<dataset>.png``). When the suite ran
with label fractions: a table of top-1 by fraction of the training labels (one column per
checkpoint and protocol) and its curves (``fractions_<dataset>.png``, fraction on a log axis).
"""
from __future__ import annotations

import math
from pathlib import Path

from keel.viz import plt

__all__ = ["write_report", "markdown", "table_rows", "fraction_rows", "plot_fewshot", "plot_fractions",
           "plot_bars"]

_FEWSHOT_NAMES = {"knn": "kNN", "linear": "linear", "finetune": "fine-tune"}


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _knn_keys(results: dict) -> list[str]:
    keys: list[str] = []
    for res in results.values():
        for k in res.get("knn", {}):
            if k.startswith("knn_top1@") and k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: int(k.split("@")[1]))


def _shots(results: dict) -> dict[str, list[str]]:
    """few-shot protocol -> shot counts (as strings, sorted numerically) present for any checkpoint."""
    out: dict[str, list[str]] = {}
    for res in results.values():
        for proto, by_shots in res.get("fewshot", {}).items():
            out.setdefault(proto, [])
            out[proto] += [s for s in by_shots if s not in out[proto]]
    return {p: sorted(s, key=int) for p, s in out.items()}


def table_rows(results: dict) -> list[tuple[str, dict[str, tuple[float, float | None]]]]:
    """``[(row name, {checkpoint: (value, std or None)})]`` for one dataset's results, in the
    order of the report's main table."""
    labels = list(results)
    rows = []

    def row(name, get):
        cells = {}
        for lb in labels:
            try:
                v = get(results[lb])
            except (KeyError, TypeError):
                continue
            if v is not None and _num(v[0]) is not None:
                cells[lb] = v
        if cells:
            rows.append((name, cells))

    for k in _knn_keys(results):
        row(f"kNN top-1, k={k.split('@')[1]}", lambda r, k=k: (r["knn"][k], None))
    row("linear probe top-1", lambda r: (r["linear"]["linear_top1"], None))
    for proto, shots in _shots(results).items():
        for s in shots:
            row(f"few-shot {_FEWSHOT_NAMES.get(proto, proto)}, {s} shot{'s' if s != '1' else ''}",
                lambda r, p=proto, s=s: (r["fewshot"][p][s]["mean"], r["fewshot"][p][s]["std"]))
    row("fine-tune top-1 (last epoch)", lambda r: (r["finetune"]["final"][r["finetune"]["main_metric"]], None))
    return rows


def _fractions(results: dict) -> list[str]:
    """The label fractions (as report.json spells them) any checkpoint has, smallest first."""
    keys = {f for r in results.values() for f in r.get("label_fractions", {})}
    return sorted(keys, key=float)


def _percent(fraction: str) -> str:
    return f"{100 * float(fraction):.4g}%"


def fraction_rows(results: dict) -> tuple[list[str], list[tuple[str, dict[str, tuple[float, None]]]]]:
    """``(columns, [(row name, {column: (top-1, None)})])`` of one dataset's label fractions: a
    column per checkpoint and protocol ("CHECKPOINT · linear"), a row per fraction ("1% (600
    images)", the subset being the same for every checkpoint)."""
    columns: list[str] = []
    for proto in ("linear", "finetune"):
        for lb, r in results.items():
            if any(proto in row for row in r.get("label_fractions", {}).values()):
                columns.append(f"{lb} · {_FEWSHOT_NAMES[proto]}")
    rows = []
    for f in _fractions(results):
        cells, n = {}, None
        for lb, r in results.items():
            row = r.get("label_fractions", {}).get(f)
            if row is None:
                continue
            n = row.get("n_train", n)
            for proto in ("linear", "finetune"):
                v = _num(row.get(proto))
                if v is not None:
                    cells[f"{lb} · {_FEWSHOT_NAMES[proto]}"] = (v, None)
        if cells:
            rows.append((f"{_percent(f)} ({n:,} images)" if n is not None else _percent(f), cells))
    return columns, rows


def _robustness_rows(results: dict) -> list[tuple[str, dict[str, tuple[float, None]]]]:
    rows: list = []
    first = next((r["robustness"] for r in results.values() if "robustness" in r), None)
    if first is None:
        return rows
    shifts = [k for k, v in first.items() if isinstance(v, dict)]

    def cells(get):
        out = {}
        for lb, r in results.items():
            if "robustness" in r:
                v = _num(get(r["robustness"]))
                if v is not None:
                    out[lb] = (v, None)
        return out

    rows.append(("clean", cells(lambda r: r["clean"])))
    for kind in shifts:
        for sev in first[kind]:
            rows.append((f"{kind}, severity {sev}", cells(lambda r, kd=kind, sv=sev: r.get(kd, {}).get(sv))))
    rows.append(("mean over shifts", cells(lambda r: r["mean_shifted"])))
    rows.append(("mean shifted / clean (%)", cells(
        lambda r: 100.0 * r["mean_shifted"] / r["clean"] if r.get("clean") else None)))
    return rows


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|")


_NO_BOLD = ("mean shifted / clean (%)",)   # a classifier at chance loses nothing: not "best"


def _md_table(rows, labels: list[str], first: str = "metric (top-1 %)", group=lambda lb: "") -> list[str]:
    """Best of a row in bold, among the columns of one ``group(column)`` (default: all)."""
    lines = [f"| {first} | " + " | ".join(_esc(lb) for lb in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for name, cells in rows:
        out = []
        for lb in labels:
            if lb not in cells:
                out.append("–")
                continue
            v, sd = cells[lb]
            rivals = [w for c, (w, _) in cells.items() if group(c) == group(lb)]
            text = f"{v:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")
            out.append(f"**{text}**" if v == max(rivals) and len(rivals) > 1 and name not in _NO_BOLD else text)
        lines.append(f"| {_esc(name)} | " + " | ".join(out) + " |")
    return lines


def markdown(report: dict, files: dict[str, dict[str, str]] | None = None) -> str:
    """The report as Markdown; ``files`` (dataset -> {kind: file name}) adds the pictures."""
    cfg = report["config"]
    labels = [c["label"] for c in cfg["checkpoints"]]
    lines = ["# keel evaluation suite", ""]
    lines += [f"keel {report.get('keel_version', '?')}, started {report.get('started', '?')}, "
              f"{report.get('seconds') or 0:.0f} s in all, on {cfg.get('device', '?')}.", ""]
    lines += ["| checkpoint | spec | image side |", "|---|---|---:|"]
    lines += [f"| {_esc(c['label'])} | `{_esc(c['spec'])}` | {c['img_size']} |" for c in cfg["checkpoints"]]
    lines.append("")
    for key, results in report["results"].items():
        info = report["datasets"].get(key, {})
        ordered = {lb: results[lb] for lb in labels if lb in results}
        lines += [f"## {key}", "",
                  f"`{info.get('source', key)}`: {info.get('train_images', '?'):,} training and "
                  f"{info.get('test_images', '?'):,} test images, {info.get('classes', '?')} classes.", ""]
        rows = table_rows(ordered)
        if rows:
            lines += _md_table(rows, list(ordered)) + [""]
        columns, frac = fraction_rows(ordered)
        if frac:
            lines += ["Top-1 by fraction of the training labels (the same class-balanced images for every "
                      "checkpoint; bold: the best checkpoint per protocol):", ""]
            lines += _md_table(frac, columns, first="labels (top-1 %)", group=lambda c: c.rsplit(" · ", 1)[1]) + [""]
        rob = _robustness_rows(ordered)
        if rob:
            scorers = sorted({r["robustness"]["scorer"] for r in ordered.values() if "robustness" in r})
            how = "the fine-tuned classifier" if scorers == ["finetune"] else \
                f"kNN ({', '.join(s.replace('knn@', 'k = ') for s in scorers)}) on frozen features"
            lines += [f"Robustness, scored by {how}:", ""]
            lines += _md_table(rob, list(ordered), first="test split (top-1 %)") + [""]
        for kind, name in (files or {}).get(key, {}).items():
            lines += [f"![{kind}]({name})", ""]
        secs = {lb: r.get("seconds", {}) for lb, r in ordered.items()}
        order = ["load", "frozen", "fewshot", "finetune", "robustness", "label_fractions"]
        parts = sorted({p for s in secs.values() for p in s if p != "total"},
                       key=lambda p: order.index(p) if p in order else len(order))
        if parts:
            lines += ["Seconds: " + "; ".join(
                f"{_esc(lb)}: " + ", ".join(f"{p} {s[p]:.0f}" for p in parts if p in s) for lb, s in secs.items()), ""]
    lines += ["## Protocols", ""]
    ks = ", ".join(str(k) for k in cfg.get("knn_ks", []))
    fs = ", ".join(_FEWSHOT_NAMES.get(p, p) for p in cfg.get("fewshot_protocols", []))
    recipe = cfg.get("finetune_recipe")
    ep = cfg.get("finetune_epochs")
    ft = {"short": f"{ep} epoch{'s' if ep != 1 else ''} of full fine-tuning, AdamW at keel's defaults",
          "hyperrule": f"BiT-HyperRule's schedule (steps x {cfg.get('hyperrule_scale')}), SGD, at the image side above",
          "config": "the FinetuneConfig given"}.get(recipe, str(recipe))
    lines += [
        f"- **kNN**: cosine similarity on frozen features, temperature-weighted votes of the k = {ks} nearest "
        f"training images (t = {cfg.get('knn_t')}).",
        f"- **linear probe**: a linear classifier on standardised frozen features, {cfg.get('linear_epochs')} epochs.",
        f"- **few-shot**: {fs} on exactly n training images per class, {cfg.get('draws')} random draws (seed "
        f"{cfg.get('seed')}); mean ± sample standard deviation over draws. Fewer shots are subsets of more shots.",
        f"- **fine-tune**: {ft}; top-1 after the last epoch (no epoch picked on the test split).",
        f"- **robustness**: the test split with Gaussian noise, Gaussian blur, lower contrast or JPEG compression at "
        f"severity {cfg.get('severity')} of 5 (CIFAR-10-C's parameters, `keel.evaluate.robustness`), scored by the "
        "fine-tuned classifier when fine-tuning ran, else by kNN against the clean training features.",
    ]
    if cfg.get("label_fractions"):
        fr = ", ".join(_percent(str(f)) for f in cfg["label_fractions"])
        how = "BiT-HyperRule's schedule for the subset's size" if recipe == "hyperrule" else \
            "the same epochs, so fewer steps"
        lines.append(f"- **label fractions** ({fr}): round(f x n) images of each class of n (at least one; seed "
                     f"{cfg.get('seed')}; a smaller fraction is part of a larger one), scored by the linear probe "
                     f"above trained on their features and, when fine-tuning ran, by the fine-tuning above on those "
                     f"images alone ({how}); the test split is the whole one.")
    lines.append("- Bold: the best checkpoint of a row. Every number is a top-1 accuracy in percent on the test split.")
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


_PROTOCOL_LINES = {"knn": "-", "linear": "--", "finetune": ":"}   # line style per protocol in the curves


def _curve_style(results: dict) -> dict[str, str]:
    """One colour per checkpoint, in the results' order."""
    return {lb: f"C{i % 10}" for i, lb in enumerate(results)}


def plot_fewshot(results: dict, path: str | Path, title: str = "") -> Path | None:
    """Accuracy against labeled images per class: one line per checkpoint and few-shot protocol
    (colour: checkpoint, line style: protocol), error bars one standard deviation."""
    curves = [(lb, proto, by_shots) for lb, r in results.items() for proto, by_shots in r.get("fewshot", {}).items()
              if by_shots]
    if not curves:
        return None
    colours, styles, (fig, ax) = _curve_style(results), _PROTOCOL_LINES, plt.subplots(figsize=(6.4, 4.0))
    for lb, proto, by_shots in curves:
        xs = sorted(by_shots, key=int)
        ax.errorbar([int(s) for s in xs], [by_shots[s]["mean"] for s in xs], yerr=[by_shots[s]["std"] for s in xs],
                    color=colours[lb], linestyle=styles.get(proto, "-."), marker="o", markersize=4, capsize=3,
                    label=f"{lb} · {_FEWSHOT_NAMES.get(proto, proto)}")
    shots = sorted({int(s) for _, _, b in curves for s in b})
    return _save_log_x(fig, ax, shots, [str(s) for s in shots], "labeled images per class", title or "few-shot", path)


def _save_log_x(fig, ax, ticks, labels, xlabel: str, title: str, path) -> Path:
    """The common end of the accuracy-vs-labels plots: log x axis with ``ticks`` labelled, grid,
    legend, saved to ``path`` and closed."""
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel="top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_fractions(results: dict, path: str | Path, title: str = "") -> Path | None:
    """Accuracy against the fraction of training labels (log axis): one line per checkpoint and
    protocol (colour: checkpoint, line style: protocol, as :func:`plot_fewshot`)."""
    curves = []
    for lb, r in results.items():
        for proto in ("linear", "finetune"):
            pts = [(float(f), _num(row.get(proto))) for f, row in r.get("label_fractions", {}).items()]
            pts = sorted((x, y) for x, y in pts if y is not None)
            if pts:
                curves.append((lb, proto, pts))
    if not curves:
        return None
    colours, styles, (fig, ax) = _curve_style(results), _PROTOCOL_LINES, plt.subplots(figsize=(6.4, 4.0))
    for lb, proto, pts in curves:
        ax.plot([x for x, _ in pts], [y for _, y in pts], color=colours[lb], linestyle=styles[proto], marker="o",
                markersize=4, label=f"{lb} · {_FEWSHOT_NAMES[proto]}")
    xs = sorted({x for _, _, pts in curves for x, _ in pts})
    return _save_log_x(fig, ax, xs, [_percent(str(x)) for x in xs], "fraction of the training labels",
                       title or "label fractions", path)


def plot_bars(rows: dict[str, dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Grouped bars (as :func:`keel.viz.curves.plot_comparison`): one group per metric, one bar per
    checkpoint, with the legend above the axes so that it never hides a bar."""
    names = list(rows)
    metrics = list(next(iter(rows.values())))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 1.2 * len(metrics) * max(1.0, len(names) / 2)), 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [m + (i - (len(names) - 1) / 2) * width for m in range(len(metrics))]
        bars = ax.bar(xs, [rows[name][k] for k in metrics], width, label=name, color=f"C{i % 10}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(3, len(names)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _bars(rows, labels: list[str], path: Path, title: str) -> Path | None:
    """:func:`plot_bars` over the rows every checkpoint has."""
    full = [(name, cells) for name, cells in rows if all(lb in cells for lb in labels)]
    if not full:
        return None
    return plot_bars({lb: {name: cells[lb][0] for name, cells in full} for lb in labels}, path, title=title)


def write_report(report: dict, out_dir: str | Path) -> dict:
    """Write ``report.md`` and the PNGs into ``out_dir``; returns
    ``{"markdown": "report.md", "figures": {dataset: {kind: file name}}}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [c["label"] for c in report["config"]["checkpoints"]]
    figures: dict[str, dict[str, str]] = {}
    short = {"kNN top-1, k=": "kNN@", "linear probe top-1": "linear", "fine-tune top-1 (last epoch)": "fine-tune"}
    for key, results in report["results"].items():
        ordered = {lb: results[lb] for lb in labels if lb in results}
        if not ordered:
            continue
        figures[key] = {}
        if plot_fewshot(ordered, out_dir / f"fewshot_{key}.png", title=f"{key}: few-shot"):
            figures[key]["few-shot"] = f"fewshot_{key}.png"
        if plot_fractions(ordered, out_dir / f"fractions_{key}.png", title=f"{key}: fraction of the labels"):
            figures[key]["label fractions"] = f"fractions_{key}.png"
        rows = [(name, cells) for name, cells in table_rows(ordered) if not name.startswith("few-shot")]
        renamed = []
        for name, cells in rows:
            for long, s in short.items():
                if name.startswith(long):
                    name = s + name[len(long):]
            renamed.append((name, cells))
        if _bars(renamed, list(ordered), out_dir / f"compare_{key}.png", f"{key}: checkpoints compared"):
            figures[key]["comparison"] = f"compare_{key}.png"
        rob = [(n.replace(", severity ", "@"), c) for n, c in _robustness_rows(ordered)
               if n not in ("mean over shifts", "mean shifted / clean (%)")]
        if _bars(rob, list(ordered), out_dir / f"robustness_{key}.png", f"{key}: robustness"):
            figures[key]["robustness"] = f"robustness_{key}.png"
    (out_dir / "report.md").write_text(markdown(report, figures))
    return {"markdown": "report.md", "figures": figures}
