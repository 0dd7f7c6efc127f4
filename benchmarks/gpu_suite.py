"""Every figure the project still owes on a GPU, in one command that fits 9 minutes on one H100.

    python benchmarks/gpu_suite.py                       # all parts on the GPU -> benchmarks/results/
    python benchmarks/gpu_suite.py --only shards_vs_synthetic --out /tmp/r
    python benchmarks/gpu_suite.py --smoke               # the same parts on the CPU at toy sizes (< 2 min)

Parts (budget on one H100; each runs in its own process, killed when it runs past its budget):

* backbones (165 s): keel_tiny vs timm's swin_tiny and keel's ViT-B vs timm's, training img/s,
  batch 256, bf16, compiled (``benchmarks/backbones.py``);
* mae_speed (100 s): MAE ViT-B pretraining img/s and MFU, keel vs the timm-encoder recipe
  (``benchmarks/mae_speed.py``);
* fashion_mnist (170 s): SimCLR time to accuracy, ``ssl_fashion_mnist.py``'s gpu preset, then kNN@200
  and linear probe of the pretrained backbone on the full splits (the random-init and raw-pixel
  baselines are left to ``ssl_fashion_mnist.py --preset gpu``: they are not owed figures);
* shards_vs_synthetic (95 s): photo-like JPEGs made on the machine itself, converted to shards with
  every core (images/s), then SimCLR at 224 px on ResNet-50 (``resnetv2_50x1_bit``) and ViT-B from
  the shards vs from random images already on the GPU: images/s of each and their ratio.

A part that fails or runs past its budget gets the row "failed: <one line>" and the suite goes on
(exit status 1 at the end). Without CUDA (and without --smoke) every row says "not measured: no GPU"
and the exit status is 0. Writes OUT/gpu_suite.json, OUT/gpu_suite.md (the table printed at the
end) and each part's output in OUT/gpu_suite_logs/. Smoke rows say "smoke": their numbers only show
that the code runs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SELF = "benchmarks/gpu_suite.py"
TOTAL_S = 540  # 9 minutes: the parts' budgets add up to at most this


# ----------------------------------------------------------------------------
# Reading what each part wrote: (value shown in the table, numbers kept in the JSON)
# ----------------------------------------------------------------------------

def read_backbones(doc: dict) -> tuple[str, dict]:
    parts, numbers = [], {}
    for r in doc["rows"]:
        mfu = f", MFU {r['keel_mfu']:.0%}" if r.get("keel_mfu") else ""
        parts.append(f"{r['keel']} {r['keel_img_s']:,.0f} img/s{mfu} vs {r['timm']} {r['timm_img_s']:,.0f} "
                     f"({r['keel_img_s'] / r['timm_img_s']:.2f}x)")
        numbers[f"{r['keel']}_img_s"] = r["keel_img_s"]
        numbers[f"{r['keel']}_timm_img_s"] = r["timm_img_s"]
    return "; ".join(parts), numbers


def read_mae(doc: dict) -> tuple[str, dict]:
    k, t = doc["rows"]["keel"], doc["rows"]["timm"]
    mfu = f" (MFU {k['mfu']:.0%})" if k.get("mfu") else ""
    numbers = {"keel_img_s": k["img_s"], "timm_img_s": t["img_s"]}
    if k.get("mfu"):
        numbers["keel_mfu"] = k["mfu"]
    return f"keel {k['img_s']:,.0f} img/s{mfu} vs timm recipe {t['img_s']:,.0f} img/s", numbers


def read_own(doc: dict) -> tuple[str, dict]:
    return doc["value"], doc["numbers"]


@dataclass
class Part:
    figure: str
    aim: str
    budget_s: int
    gpu: list[str]    # argv after ``python``, run from the repository root; ``--json FILE`` is added
    smoke: list[str]
    read: Callable[[dict], tuple[str, dict]]


PARTS: dict[str, Part] = {
    "backbones": Part(
        "backbone training speed vs timm (H100, batch 256, bf16, compiled)",
        "keel_tiny >= 1.3x swin_tiny's 4,020 img/s; ViT-B >= timm's 3,272 img/s", 165,
        ["benchmarks/backbones.py", "--device", "cuda", "--batch", "256", "--bf16", "--compile",
         "--pairs", "keel_tiny", "vit_base_patch16", "--steps", "20", "--warmup", "3"],
        ["benchmarks/backbones.py", "--pairs", "resnet18", "--batch", "2", "--img-size", "32",
         "--steps", "1", "--warmup", "1"], read_backbones),
    "mae_speed": Part(
        "MAE ViT-B pretraining speed (batch 256, bf16, compiled)",
        ">= 5,400 img/s on an H100, with MFU; the timm-encoder recipe reaches 4,538", 100,
        ["benchmarks/mae_speed.py", "--device", "cuda", "--batch", "256", "--bf16", "--compile",
         "--steps", "20", "--warmup", "3"],
        ["benchmarks/mae_speed.py", "--batch", "2", "--img-size", "32", "--decoder", "1x32x2",
         "--steps", "1", "--warmup", "1"], read_mae),
    "fashion_mnist": Part(
        "Fashion-MNIST SimCLR time to accuracy (resnet18_cifar, gpu preset)",
        ">= 86 kNN@200, >= 89 linear in <= 150 s on an H100 (lightly's SimCLR: 84.4 in 294 s)", 170,
        [SELF, "--part", "fashion_mnist"], [SELF, "--part", "fashion_mnist", "--smoke"], read_own),
    "shards_vs_synthetic": Part(
        "SimCLR at 224 px from shards vs synthetic batches on the GPU (ResNet-50, ViT-B), and shard conversion",
        "shards / synthetic >= 0.90 for both models", 95,
        [SELF, "--part", "shards_vs_synthetic"], [SELF, "--part", "shards_vs_synthetic", "--smoke"], read_own),
}
assert sum(p.budget_s for p in PARTS.values()) <= TOTAL_S


# ----------------------------------------------------------------------------
# The parts written here (run in a child process: ``--part NAME --json FILE``)
# ----------------------------------------------------------------------------

def part_fashion_mnist(smoke: bool) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from ssl_fashion_mnist import PRESETS

    from keel.config import load_config
    from keel.data.sources import build_dataset
    from keel.engine.checkpoint import load_backbone
    from keel.engine.distributed import resolve_device
    from keel.evaluate.frozen import evaluate_frozen
    from keel.jobs.pretrain import pretrain

    if smoke:   # the cpu preset shrunk to seconds; evaluation on subsets
        overrides = [*PRESETS["cpu"], "data.subset=512", "train.epochs=1", "train.batch_size=128", "train.knn_every=0",
                     "train.device=cpu", "method.proj_hidden_dim=64", "method.proj_dim=32"]
        n_train, n_test, linear_epochs = 2000, 500, 5
    else:
        overrides, n_train, n_test, linear_epochs = PRESETS["gpu"], 0, 0, None
    cfg = load_config(None, ["data.source=fashion-mnist", *overrides])
    device = resolve_device(cfg.train.device)
    size = cfg.data.img_size
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pretrain(cfg, Path(tmp) / "run", quiet=True)
        train_s = time.perf_counter() - t0    # as ssl_fashion_mnist.py counts it: compilation included
        backbone = load_backbone(Path(tmp) / "run")
    train = build_dataset("fashion-mnist", "train", size, subset=n_train)
    test = build_dataset("fashion-mnist", "test", size, subset=n_test)
    torch.manual_seed(cfg.train.seed)
    r = evaluate_frozen(backbone.to(device), train, test, size, device, ks=(200,), temperature=0.1,
                        linear_epochs=linear_epochs or cfg.eval.linear_epochs,
                        amp_dtype=torch.bfloat16 if device.type == "cuda" else None)
    knn, lin = r["knn_top1@200"], r["linear_top1"]
    return {"value": f"kNN@200 {knn:.1f}, linear {lin:.1f} after {train_s:.0f} s of pretraining",
            "numbers": {"train_s": train_s, "knn200": knn, "linear": lin}}


def _photo(job: tuple[str, int, int, int]) -> None:
    """One photo-like JPEG: smooth colour regions (like sky, walls) plus texture at two scales, so
    that its size on disk and its decoding cost are a photo's, not a flat image's."""
    from PIL import Image

    path, w, h, seed = job
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC),
                      dtype=np.int16)
    blotches = Image.fromarray(rng.integers(0, 256, (h // 32, w // 32), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    grain = rng.integers(-12, 13, (h, w, 1), dtype=np.int16)
    pixels = base + (np.asarray(blotches, dtype=np.int16)[..., None] - 128) // 3 + grain
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_photos(folder: Path, n: int, sizes: list[tuple[int, int]], workers: int) -> None:
    import multiprocessing

    folder.mkdir(parents=True)
    jobs = [(str(folder / f"{i:06d}.jpg"), *sizes[i % len(sizes)], i) for i in range(n)]
    with multiprocessing.Pool(workers) as pool:
        pool.map(_photo, jobs, chunksize=16)


def images_per_s(run_dir: Path, skip: int) -> float:
    """Median ``img_per_s`` of the run's logged windows after the first ``skip`` (start-up, cuDNN's
    algorithm search, the first shard reads)."""
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["img_per_s"] for r in logged if "img_per_s" in r][skip:]
    if not speeds:
        raise RuntimeError(f"{run_dir}: no logged img_per_s after the first {skip}")
    return statistics.median(speeds)


def fit_synthetic(cfg, run_dir: Path, n: int) -> None:
    """The same run on ``n`` random uint8 images held in memory: the trainer keeps an in-memory
    dataset resident on the GPU, so its batches cost no reading or decoding (as keel.jobs.pretrain
    builds a run, minus the data and the export)."""
    import torch

    from keel.data.builtins import InMemoryImages
    from keel.engine.trainer import Trainer
    from keel.jobs.pretrain import build_pretraining

    size = cfg.data.img_size
    data = InMemoryImages(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), name="synthetic")
    method, cfg = build_pretraining(cfg)
    Trainer(cfg, run_dir, quiet=True).fit(method, data)


def part_shards_vs_synthetic(smoke: bool) -> dict:
    import gc

    import torch

    from keel.config import load_config
    from keel.data.shards_write import write_shards
    from keel.jobs.pretrain import pretrain

    workers = os.cpu_count() or 1
    if smoke:
        n, sizes, side, per_shard, n_synth = 24, [(96, 72), (72, 96)], 64, 8, 64
        models = [("resnet10_cifar", 32, 8), ("vit_tiny_patch4_32", 32, 8)]   # (model, img_size, batch)
        steps, every, skip = 6, 1, 2
        extra = ["train.device=cpu", "data.num_workers=0", "method.proj_hidden_dim=64", "method.proj_dim=32"]
    else:
        # 4096 photos of 1024x768 / 768x1024 in 32 shards (write_shards gives each process whole
        # shards: 32 keep 16 cores busy); ViT-B at batch 128 (256 views) to stay clear of 80 GB.
        # Not compiled: two compilations per model would not fit the part's budget, and the
        # question is whether reading keeps up, which the eager step asks as well.
        n, sizes, side, per_shard, n_synth = 4096, [(1024, 768), (768, 1024)], 256, 128, 2048
        models = [("resnetv2_50x1_bit", 224, 256), ("vit_base_patch16", 224, 128)]
        steps, every, skip = 40, 5, 2
        extra = ["train.device=cuda"]
    numbers: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        make_photos(tmp_path / "photos", n, sizes, workers)
        index = write_shards(tmp_path / "photos", tmp_path / "shards", max_side=side, per_shard=per_shard,
                             workers=workers, progress=False)
        numbers["convert_img_s"] = index["run"]["converted"] / index["run"]["seconds"]
        texts = [f"conversion {numbers['convert_img_s']:,.0f} img/s ({min(workers, len(index['shards']))} processes)"]
        for name, size, batch in models:
            common = [f"model.name={name}", f"data.img_size={size}", f"train.batch_size={batch}", "method.name=simclr",
                      "train.epochs=1000", f"train.max_steps={steps}", f"train.log_every={every}", "train.knn_every=0",
                      # no checkpoint inside the timed windows, and no warm-up to wait through
                      "train.ckpt_every=1000000000", "train.warmup_epochs=0", f"train.out_dir={tmp}", *extra]
            pretrain(load_config(None, [f"data.source=shards:{tmp_path / 'shards'}", *common]),
                     tmp_path / f"{name}-shards", quiet=True)
            from_shards = images_per_s(tmp_path / f"{name}-shards", skip)
            gc.collect()
            torch.cuda.empty_cache()
            fit_synthetic(load_config(None, ["data.source=digits", *common]), tmp_path / f"{name}-synthetic", n_synth)
            synthetic = images_per_s(tmp_path / f"{name}-synthetic", skip)
            gc.collect()
            torch.cuda.empty_cache()
            numbers.update({f"{name}_shards_img_s": from_shards, f"{name}_synthetic_img_s": synthetic,
                            f"{name}_ratio": from_shards / synthetic})
            texts.append(f"{name} (batch {batch}) {from_shards:,.0f} vs {synthetic:,.0f} img/s "
                         f"= {from_shards / synthetic:.2f}")
    return {"value": "; ".join(texts), "numbers": numbers}


OWN_PARTS = {"fashion_mnist": part_fashion_mnist, "shards_vs_synthetic": part_shards_vs_synthetic}


# ----------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------

def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:200]


def run_part(name: str, part: Part, mode: str, logs: Path) -> dict:
    """One row: the part run in a child process of its own (a crash, a hang or GPU memory it
    holds ends with it), killed with everything it started when it runs past its budget."""
    argv = part.smoke if mode == "smoke" else part.gpu
    alone = (f"python {SELF} --only {name}" + (" --smoke" if mode == "smoke" else "")
             if argv[0] == SELF else "python " + " ".join(argv))
    row = {"part": name, "figure": part.figure, "aim": part.aim, "command": alone, "budget_s": part.budget_s,
           "numbers": {}, "seconds": 0.0}
    if mode == "none":
        return dict(row, status="not measured: no GPU", value="not measured: no GPU")
    print(f"[{name}] running (budget {part.budget_s} s): {alone}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "part.json"
        proc = subprocess.Popen([sys.executable, *argv, "--json", str(out_json)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, error = proc.communicate(timeout=part.budget_s)[0], None
            if proc.returncode:
                error = last_line(output)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)    # its own workers (shard writers, compilers) too
            output, error = proc.communicate()[0], f"ran past its budget of {part.budget_s} s"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        (logs / f"{name}.txt").write_text(output or "")
        if error is None:
            try:
                value, numbers = part.read(json.loads(out_json.read_text()))
                row.update(value=value, numbers=numbers)
            except Exception as e:   # a part that ran but wrote what its reader cannot use
                error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    if error is not None:
        row.update(status="failed", value=f"failed: {error}")
    else:
        row["status"] = "smoke" if mode == "smoke" else "measured"
        if mode == "smoke":
            row["value"] = f"smoke: {row['value']}"
    print(f"[{name}] {row['value']} ({row['seconds']} s)", flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")
    lines = ["| figure | value | aim | command to reproduce alone |", "|---|---|---|---|"]
    lines += [f"| {cell(r['figure'])} | {cell(r['value'])} | {cell(r['aim'])} | `{cell(r['command'])}` |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for gpu_suite.json and gpu_suite.md")
    ap.add_argument("--only", nargs="+", choices=list(PARTS), help="run only these parts")
    ap.add_argument("--smoke", action="store_true", help="the same parts on the CPU at toy sizes: not figures")
    ap.add_argument("--part", choices=list(OWN_PARTS), help=argparse.SUPPRESS)   # a child process's one part
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        result = OWN_PARTS[args.part](args.smoke)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(result["value"])
        return 0

    import torch

    gpu = torch.cuda.is_available()
    mode = "smoke" if args.smoke else ("gpu" if gpu else "none")
    device = torch.cuda.get_device_name(0) if mode == "gpu" else "CPU" if mode == "smoke" else "no GPU"
    out = Path(args.out)
    logs = out / "gpu_suite_logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = [run_part(name, PARTS[name], mode, logs) for name in (args.only or PARTS)]
    report = {"mode": mode, "device": device, "torch": torch.__version__, "total_budget_s": TOTAL_S,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
    table = markdown(rows)
    (out / "gpu_suite.md").write_text(f"GPU suite ({mode}) on {device}, torch {torch.__version__}, "
                                      f"{report['seconds']:.0f} s\n\n{table}")
    print(f"\n{device}, {mode}, {report['seconds']:.0f} s; written to {out / 'gpu_suite.json'} and gpu_suite.md\n")
    print(table)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
