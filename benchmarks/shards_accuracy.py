"""Does training from shards cost accuracy? SimCLR from memory vs from ``keel shards``, same images.

For each dataset and seed, two pretraining runs differ only in ``data.source``:

* memory -- the built-in loader (:class:`~keel.data.builtins.InMemoryImages`), as ``keel demo``
  and ``benchmarks/ssl_fashion_mnist.py`` train;
* shards -- the same training images exported as PNGs into class sub-folders, converted by
  :func:`keel.data.shards_write.write_shards` (JPEG quality 90, never upscaled) and read back with
  ``data.source=shards:<out>`` (seeded shuffled stream, crops over the whole stored image).

Both backbones are then scored with the same frozen protocol (``evaluate_frozen``: kNN@20,
kNN@200, linear probe) on the built-in test split, and the paired difference shards - memory is
reported with its standard error over seeds.

Datasets and protocols:

* ``digits`` -- ``keel demo``'s config (SimCLR, resnet10_cifar, 16 px); the 1437 training
  images are exported at their native 8x8 (sklearn's 0..16 scaled to 0..255), so the shards run
  enlarges 8x8 JPEGs to 16 px in its crops while the memory run crops the pre-resized 16x16 ones.
* ``fashion`` -- ``ssl_fashion_mnist.py``'s "cpu" preset (24 px), fewer epochs. ``data.subset``
  is drawn from ``train.seed`` and does not apply to shards, so both runs instead see one fixed
  10k subset drawn once with seed 1234: its 28x28 pixels are written as IDX files next to links
  to the original test files, a folder the built-in Fashion-MNIST loader reads as itself
  (``data.source=<that folder>``: the same in-memory path, resize and crops as
  ``data.source=fashion-mnist``), and the same 10k images are exported as the PNGs for the shards.
  Evaluation uses the full 60k train split as kNN bank / probe training set, as the preset does.

Two controls, to tell the causes of a difference apart:

* ``digits16`` -- digits exported at the 16x16 the memory run trains on (its exact pixels), so
  the shards run crops the same image and only JPEG and the stream differ;
* ``fashion-mixed`` -- the same 10k PNGs converted from a CSV listing them in a seeded random
  order: a folder converts in sorted path order, so each class-folder shard holds about one class
  and batches mix classes only as far as the 4096-sample shuffle buffer reaches (``batch_mix`` in
  the results); the CSV order mixes them within every shard.

Their memory runs are the same runs as their base dataset's (same config and images): with
``--reuse`` they are taken from the results file instead of rerun (a seed's run is deterministic).
Each invocation adds its datasets to the results file and keeps the others.

The image export and conversion happen once per dataset (the image set does not depend on the
seed); each run's ``train.seed`` is the seed.

    python benchmarks/shards_accuracy.py                        # digits + fashion, seeds 0 1 2
    python benchmarks/shards_accuracy.py --datasets digits16 fashion-mixed --reuse
    python benchmarks/shards_accuracy.py --datasets digits --seeds 0 --epochs 5 --out /tmp/try.json
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import shlex
import sys
import tarfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from keel.config import load_config
from keel.data.shards import ShardSource
from keel.data.sources import build_dataset
from keel.data.shards_write import write_shards
from keel.demo import DEMO_DEFAULTS
from keel.engine.checkpoint import load_backbone
from keel.evaluate.frozen import evaluate_frozen
from keel.jobs.pretrain import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssl_fashion_mnist import PRESETS  # noqa: E402  (the Fashion-MNIST protocol lives there)

FASHION_SUBSET, FASHION_SUBSET_SEED = 10_000, 1234
ORDER_SEED = 0
# name -> (protocol, exported side, conversion order: "folder" = sorted paths, "csv" = shuffled)
VARIANTS = {"digits": ("digits", 8, "folder"), "digits16": ("digits", 16, "folder"),
            "fashion": ("fashion", 28, "folder"), "fashion-mixed": ("fashion", 28, "csv")}
METRICS = {"kNN@20": "knn_top1@20", "kNN@200": "knn_top1@200", "linear": "linear_top1"}
# Epochs chosen so that 2 datasets x 3 seeds x 2 sources end in about 25 min on 2 idle CPU cores
# (digits: half of keel demo's 40).
DEFAULT_EPOCHS = {"digits": 20, "fashion": 3}
RESULTS = Path(__file__).resolve().parent / "results" / "shards_accuracy.json"


# ----------------------------------------------------------------------------
# The two data sources
# ----------------------------------------------------------------------------


def export_pngs(images: torch.Tensor, labels: torch.Tensor, folder: Path) -> None:
    """Grey uint8 (N, H, W) -> ``folder/<label>/<i>.png``, lossless, at native size."""
    for i, (img, lab) in enumerate(zip(images.numpy(), labels.tolist())):
        d = folder / str(lab)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(d / f"{i:05d}.png")


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (the format Fashion-MNIST ships in)."""
    head = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(head + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_order_csv(png: Path, csv_path: Path) -> None:
    """The PNGs under ``png`` as a CSV (image, label) in a seeded random order."""
    files = sorted(png.glob("*/*.png"))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(ORDER_SEED)).tolist()
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label"])
        for i in order:
            w.writerow([files[i].relative_to(csv_path.parent).as_posix(), files[i].parent.name])


def jpeg_error(shards: Path, png_root: Path) -> dict:
    """How far the stored JPEGs are from the exported pixels (grey levels, 0..255)."""
    diffs = []
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:
                if not name.endswith(".jpg"):
                    continue
                meta = json.loads(tar.extractfile(members[name[:-4] + ".json"]).read())
                stored = np.asarray(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("L"))
                original = np.asarray(Image.open(png_root / meta["path"]).convert("L"))
                diffs.append(np.abs(stored.astype(np.int16) - original.astype(np.int16)))
    d = np.stack(diffs)
    return {"mean_abs": round(float(d.mean()), 3), "p99_abs": float(np.percentile(d, 99)), "max_abs": int(d.max())}


def batch_mix(shards: str, batch_size: int, labels: torch.Tensor) -> dict:
    """Class mix of the first epoch's shard batches next to uniformly shuffled batches of the same
    labels: a folder converts in sorted path order, so each shard holds few classes and only the
    shuffle buffer mixes them."""
    def stats(batches: list[list[int]]) -> tuple[float, float]:
        counts = [np.bincount(b, minlength=10) for b in batches]
        return (round(float(np.mean([(c > 0).sum() for c in counts])), 2),
                round(float(np.mean([c.max() / c.sum() for c in counts])), 3))
    source = ShardSource(f"shards:{shards}", 16)
    streamed = [[int(m["cls"]) for _, m in b] for b in source.raw_batches(0, 0, batch_size)]
    perm = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))].tolist()
    uniform = [perm[i:i + batch_size] for i in range(0, len(perm) - batch_size + 1, batch_size)]
    (c_s, top_s), (c_u, top_u) = stats(streamed), stats(uniform)
    return {"batch_size": batch_size, "shuffle_buffer": source.shuffle_buffer,
            "classes_per_batch": {"shards": c_s, "uniform": c_u},
            "largest_class_share": {"shards": top_s, "uniform": top_u}}


def prepare(dataset: str, work: Path) -> dict:
    """Export the training images and convert them to shards (once); return the memory source,
    the shards folder and what was done."""
    base, side, order = VARIANTS[dataset]
    root = work / dataset
    png, shards = root / "png", root / "shards"
    if base == "digits":
        train = build_dataset("digits", "train", side)     # 8: sklearn's pixels, only scaled to 0..255
        gray, labels, memory = train.images[:, 0], train.labels, "digits"
    else:
        full = build_dataset("fashion-mnist", "train", 28)
        keep = torch.randperm(len(full), generator=torch.Generator().manual_seed(FASHION_SUBSET_SEED))
        keep = keep[:FASHION_SUBSET].sort().values
        gray, labels = full.images[keep, 0], full.labels[keep]
        idx = work / base / "idx"       # shared by the variants: their memory runs are the same
        idx.mkdir(parents=True, exist_ok=True)
        write_idx(idx / "train-images-idx3-ubyte", gray.numpy())
        write_idx(idx / "train-labels-idx1-ubyte", labels.numpy())
        src_dir = os.environ.get("KEEL_FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist"
        for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            name = next(n for n in (stem, stem + ".gz") if os.path.isfile(os.path.join(src_dir, n)))
            link = idx / name
            if not link.exists():
                link.symlink_to(os.path.join(src_dir, name))
        memory = str(idx)
        # the memory run must read exactly these images through the built-in loader
        check = build_dataset(memory, "train", 28)
        assert torch.equal(check.images[:, 0], gray) and torch.equal(check.labels, labels)
    t0 = time.perf_counter()
    if not png.exists():             # whole or not at all, so a killed export is redone
        export_pngs(gray, labels, png.with_name("png.tmp"))
        png.with_name("png.tmp").rename(png)
    src, paths_root = png, png
    if order == "csv":
        src, paths_root = root / "items.csv", root
        write_order_csv(png, src)
    index = write_shards(src, shards, per_shard=1000, workers=2, progress=False)
    return {"memory_source": memory, "shards": str(shards), "images": int(len(labels)),
            "native_size": list(gray.shape[-2:]), "shards_count": len(index["shards"]),
            "shards_bytes": sum(s["bytes"] for s in index["shards"]), "dropped": index["dropped"],
            "prepare_seconds": round(time.perf_counter() - t0, 1), "jpeg_error": jpeg_error(shards, paths_root),
            "labels": labels}


# ----------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------


def protocol(dataset: str, epochs: int) -> tuple[list[str], dict | None, str, int]:
    """(overrides, defaults, built-in name for evaluation, img_size) of a dataset's protocol."""
    if VARIANTS[dataset][0] == "digits":
        return [f"train.epochs={epochs}", "train.knn_every=0"], DEMO_DEFAULTS, "digits", 16
    # data.subset is replaced by the fixed 10k subset (see the docstring); no kNN monitor
    preset = [o for o in PRESETS["cpu"] if not o.startswith(("data.subset", "train.knn_every", "train.knn_subset"))]
    return [*preset, f"train.epochs={epochs}", "train.knn_every=0"], None, "fashion-mnist", 24


def run_overrides(dataset: str, source: str, seed: int, epochs: int, prep: dict) -> list[str]:
    data = (["data.source=" + prep["memory_source"]] if source == "memory"
            else [f"data.source=shards:{prep['shards']}", "data.num_workers=2"])
    return [*protocol(dataset, epochs)[0], *data, f"train.seed={seed}", "train.device=cpu"]


def run_one(dataset: str, source: str, seed: int, epochs: int, prep: dict, work: Path, eval_data,
            done: dict) -> dict:
    """One pretraining run and its evaluation, or the same run found in ``done`` (by overrides)."""
    overrides = run_overrides(dataset, source, seed, epochs, prep)
    if tuple(overrides) in done:
        row = done[tuple(overrides)]
        print(f"  {dataset} {source:<6} seed {seed}: reused from {row['reused_from']}", flush=True)
        return row
    _, defaults, _, size = protocol(dataset, epochs)
    cfg = load_config(None, overrides, defaults=defaults)
    run_dir = work / "runs" / f"{dataset}-{source}-seed{seed}"
    t0 = time.perf_counter()
    result = pretrain(cfg, run_dir, quiet=True)
    train_s = time.perf_counter() - t0
    train, test = eval_data
    torch.manual_seed(seed)
    r = evaluate_frozen(load_backbone(run_dir), train, test, size, "cpu", ks=tuple(cfg.eval.knn_k),
                        temperature=cfg.eval.knn_t, linear_epochs=cfg.eval.linear_epochs)
    row = {name: round(float(r[key]), 2) for name, key in METRICS.items()}
    row.update(final_loss=round(float(result["loss"]), 4), steps=int(result["steps"]),
               pretrain_seconds=round(train_s, 1), total_seconds=round(time.perf_counter() - t0, 1))
    print(f"  {dataset} {source:<6} seed {seed}: " + "  ".join(f"{m} {row[m]:.2f}" for m in METRICS)
          + f"  ({row['pretrain_seconds']:.0f} s pretrain, {row['total_seconds']:.0f} s in all)", flush=True)
    return {"overrides": overrides, **row}


def summarize(runs: dict, seeds: list[int]) -> dict:
    """Mean +- std per source; paired shards - memory difference, mean +- standard error, verdict."""
    out: dict = {}
    for m in METRICS:
        mem = np.array([runs["memory"][str(s)][m] for s in seeds])
        sh = np.array([runs["shards"][str(s)][m] for s in seeds])
        d = sh - mem
        n = len(seeds)
        se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        mean = float(d.mean())
        level = abs(mean) < 0.5 or (n > 1 and abs(mean) < 2 * se)
        out[m] = {"memory_mean": round(float(mem.mean()), 2), "memory_std": round(float(mem.std(ddof=1)), 2) if n > 1 else None,
                  "shards_mean": round(float(sh.mean()), 2), "shards_std": round(float(sh.std(ddof=1)), 2) if n > 1 else None,
                  "diff_mean": round(mean, 2), "diff_se": round(se, 2) if n > 1 else None,
                  "verdict": "level" if level else "differs"}
    return out


def pm(mean, spread) -> str:
    return f"{mean:.2f}" if spread is None else f"{mean:.2f} ± {spread:.2f}"


def table(results: dict) -> str:
    lines = ["| dataset | metric | memory (mean ± std) | shards (mean ± std) | shards − memory (mean ± s.e.) | verdict |",
             "|---|---|---|---|---|---|"]
    for ds, r in results.items():
        for m, s in r["summary"].items():
            lines.append(f"| {ds} | {m} | {pm(s['memory_mean'], s['memory_std'])} | {pm(s['shards_mean'], s['shards_std'])}"
                         f" | {s['diff_mean']:+.2f}" + (f" ± {s['diff_se']:.2f}" if s["diff_se"] is not None else "")
                         + f" | {s['verdict']} |")
    lines += ["", "| dataset | source | seed | kNN@20 | kNN@200 | linear | pretrain s |", "|---|---|---|---|---|---|---|"]
    for ds, r in results.items():
        for src in ("memory", "shards"):
            for seed, row in r["runs"][src].items():
                lines.append(f"| {ds} | {src} | {seed} | {row['kNN@20']:.2f} | {row['kNN@200']:.2f} | {row['linear']:.2f}"
                             f" | {row['pretrain_seconds']:.0f} |")
    return "\n".join(lines)


def read_report(path: Path) -> dict:
    """The results file so far (its other datasets are kept), or a new one."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"invocations": [], "datasets": {}}
    if "invocations" not in report:      # the first version held one invocation at the top
        report["invocations"] = [{k: report.pop(k) for k in ("command", "date", "wall_seconds")}]
        report["invocations"][0]["datasets"] = list(report["datasets"])
        for r in report["datasets"].values():
            r.setdefault("command", report["invocations"][0]["command"])
    return report


def earlier_runs(report: dict) -> dict:
    """Every run in ``report`` by its overrides."""
    return {tuple(row["overrides"]): {**row, "reused_from": f"{ds} {src} seed {seed}"}
            for ds, r in report["datasets"].items() for src, seeds in r["runs"].items()
            for seed, row in seeds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=list(VARIANTS), default=["digits", "fashion"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"pretraining epochs for every dataset (default: {DEFAULT_EPOCHS})")
    ap.add_argument("--reuse", action="store_true",
                    help="take runs with the same overrides from --out instead of running them again")
    ap.add_argument("--work", default="runs/shards-accuracy", help="exported images, shards and run folders")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    work, out = Path(args.work), Path(args.out)
    report = read_report(out)
    done = earlier_runs(report) if args.reuse else {}
    t0 = time.perf_counter()
    results: dict = {}
    for ds in args.datasets:
        epochs = args.epochs or DEFAULT_EPOCHS[VARIANTS[ds][0]]
        prep = prepare(ds, work)
        _, defaults, _, _ = protocol(ds, epochs)
        batch = load_config(None, protocol(ds, epochs)[0], defaults=defaults).train.batch_size
        prep["batch_mix"] = batch_mix(prep["shards"], batch, prep.pop("labels"))
        print(f"{ds}: {prep['images']} images {prep['native_size']} -> {prep['shards_count']} shards, "
              f"{prep['shards_bytes'] / 1e6:.2f} MB, JPEG error {prep['jpeg_error']}, batch mix {prep['batch_mix']}",
              flush=True)
        _, _, name, size = protocol(ds, epochs)
        eval_data = (build_dataset(name, "train", size), build_dataset(name, "test", size))
        runs = {src: {str(s): run_one(ds, src, s, epochs, prep, work, eval_data, done) for s in args.seeds}
                for src in ("memory", "shards")}
        results[ds] = {"epochs": epochs, "eval": {"train": len(eval_data[0]), "test": len(eval_data[1]),
                                                   "img_size": size},
                       "data": prep, "runs": runs, "summary": summarize(runs, args.seeds)}

    wall = time.perf_counter() - t0
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/shards_accuracy.py", *sys.argv[1:]])
    for r in results.values():
        r["command"] = command
    report.update(machine="2-core CPU", torch=torch.__version__, python=platform.python_version(),
                  verdict_rule="level when |mean diff| < 2 x its standard error over seeds or < 0.5 points")
    report["invocations"].append({"command": command, "date": date.today().isoformat(),
                                  "wall_seconds": round(wall, 1), "datasets": list(results)})
    report["datasets"].update(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nshards vs memory, top-1 (%), seeds {args.seeds}, {wall / 60:.1f} min\n")
    print(table(report["datasets"]))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
