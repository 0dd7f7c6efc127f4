"""keel against lightly over several seeds: the paired differences, their mean and its uncertainty.

Each run of ``benchmarks/ssl_methods.py`` at one seed trains keel's and lightly's version of a
method from the same initial weights; seed-to-seed spread is larger than the gap between the
two, so the comparison that means something is the mean of the per-seed differences with its
standard error. This script reads the ``ssl_methods.json`` of those runs and prints that table.

    python benchmarks/seed_pairs.py dino runs/dino20/seed*
    python benchmarks/seed_pairs.py swav runs/swav20/seed8 runs/swav20/seed9 runs/swav20/seed10

A run directory (or a json file) may hold one side only (``--no-keel`` / ``--no-lightly`` runs);
when two given paths hold the same side of the same seed, the later one on the command line is
used and the table says which path each number came from. keel's row is its student where the
run has one (DINO: lightly's loop trains and is scored on its student too).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

METRICS = ("knn200", "linear")


def run_seed(report: dict) -> int:
    seed = 0  # keel's config default
    for override in report.get("overrides", []):
        key, _, value = override.partition("=")
        if key == "train.seed":
            seed = int(value)
    return seed


def collect(method: str, paths: list[Path]) -> dict[int, dict[str, tuple[dict, Path]]]:
    """{seed: {"keel"|"lightly": (row, path)}}; a later path replaces an earlier one."""
    found: dict[int, dict[str, tuple[dict, Path]]] = {}
    for path in paths:
        file = path / "ssl_methods.json" if path.is_dir() else path
        if not file.is_file():
            raise SystemExit(f"seed_pairs: no ssl_methods.json at {path}")
        report = json.loads(file.read_text())
        rows = {row["name"]: row for row in report["rows"]}
        keel_row = rows.get(f"keel {method} (student)") or rows.get(f"keel {method}")
        sides = {"keel": keel_row, "lightly": rows.get(f"lightly {method}")}
        for side, row in sides.items():
            if row is not None and all(k in row for k in METRICS):
                found.setdefault(run_seed(report), {})[side] = (row, path)
    return found


def t_quantile_975(dof: int) -> float:
    """Two-sided 95% quantile of Student's t; scipy's when present, else the normal's 1.96."""
    try:
        from scipy.stats import t
    except ImportError:
        return 1.96
    return float(t.ppf(0.975, dof))


def summarize(diffs: list[float]) -> dict[str, float]:
    """Mean of the paired differences, their standard deviation, the standard error and a 95% interval."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "sd": math.nan, "se": math.nan, "lo": math.nan, "hi": math.nan}
    sd = statistics.stdev(diffs)
    se = sd / math.sqrt(len(diffs))
    half = t_quantile_975(len(diffs) - 1) * se
    return {"mean": mean, "sd": sd, "se": se, "lo": mean - half, "hi": mean + half}


def table(method: str, found: dict[int, dict[str, tuple[dict, Path]]]) -> str:
    paired = {s: v for s, v in sorted(found.items()) if "keel" in v and "lightly" in v}
    if not paired:
        raise SystemExit(f"seed_pairs: no seed has both a keel and a lightly {method} row")
    lines = [f"{method}, kNN@200 / linear over {len(paired)} seeds",
             "", "| seed | keel | lightly | keel − lightly | keel from | lightly from |",
             "|---|---|---|---|---|---|"]
    diffs: dict[str, list[float]] = {k: [] for k in METRICS}
    means: dict[str, dict[str, list[float]]] = {"keel": {k: [] for k in METRICS}, "lightly": {k: [] for k in METRICS}}
    for seed, sides in paired.items():
        (k_row, k_path), (l_row, l_path) = sides["keel"], sides["lightly"]
        for m in METRICS:
            diffs[m].append(k_row[m] - l_row[m])
            means["keel"][m].append(k_row[m])
            means["lightly"][m].append(l_row[m])
        lines.append(f"| {seed} | {k_row['knn200']:.2f} / {k_row['linear']:.2f} | "
                     f"{l_row['knn200']:.2f} / {l_row['linear']:.2f} | "
                     f"{diffs['knn200'][-1]:+.2f} / {diffs['linear'][-1]:+.2f} | {k_path} | {l_path} |")
    avg = {side: {m: statistics.fmean(v) for m, v in d.items()} for side, d in means.items()}
    stats = {m: summarize(diffs[m]) for m in METRICS}
    lines.append(f"| **mean** | {avg['keel']['knn200']:.2f} / {avg['keel']['linear']:.2f} | "
                 f"{avg['lightly']['knn200']:.2f} / {avg['lightly']['linear']:.2f} | "
                 f"**{stats['knn200']['mean']:+.2f} / {stats['linear']['mean']:+.2f}** | | |")
    lines.append("")
    for m, name in zip(METRICS, ("kNN@200", "linear")):
        s = stats[m]
        lines.append(f"- {name}: keel − lightly {s['mean']:+.2f}, per-seed sd {s['sd']:.2f}, "
                     f"standard error {s['se']:.2f}, 95% interval {s['lo']:+.2f} to {s['hi']:+.2f}")
    unpaired = sorted(set(found) - set(paired))
    if unpaired:
        lines.append(f"- seeds with one side only, left out: {', '.join(map(str, unpaired))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("method", help="the method's name as in ssl_methods.py's rows: swav, dino, simclr, byol")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of ssl_methods.py (or their json files)")
    args = ap.parse_args(argv)
    print(table(args.method, collect(args.method, args.runs)))


if __name__ == "__main__":
    sys.exit(main())
