"""Before/after record of keel's training loops: does a refactor change what they compute?

Drives the ``keel`` CLI only through ``python -m keel ...`` in subprocesses, so it measures
whichever source tree ``PYTHONPATH`` selects (the import path actually used is recorded in the
JSON as ``env.keel_file``). Two parts (``--part ssl|finetune|all``):

* ``ssl``: each of the nine methods (simclr swav mae simmim dino mocov3 byol simsiam rotation)
  pretrains ``vit_tiny_patch4_32`` on the built-in ``digits`` on the CPU, seed 0, exactly 20
  steps of 64 images, a loss logged every step, no kNN monitor. Recorded per method: the 20
  per-step losses exactly as written in the run's ``metrics.jsonl`` (full float repr), the sha256
  of the exported ``backbone.safetensors`` tensors (raw bytes of each tensor, keys sorted, loaded
  with ``safetensors.torch.load_file``, so file metadata does not count) and the exact command.
  Each method runs ``--ssl-repeats`` times (default 2); ``deterministic`` says whether all
  repeats gave identical losses and hashes. A refactor that changes nothing must reproduce the
  losses and the hashes bit for bit.
* ``finetune``: short CPU fine-tuning runs with the flat-key CLI (``python -m keel finetune
  key=value ...``), each with every seed of ``--seeds`` (default 0 1 2): full and linear
  fine-tuning of a random ResNet-10; a DeiT-recipe student (``deit_tiny_distilled_patch16``)
  with hard distillation from a ResNet-10 teacher (the teacher is itself a recorded fine-tuning
  run, seed 0, made first); BiT-HyperRule (``recipe=bit``, on ``resnetv2_14_tiny_cifar``,
  ``recipe_max_side=16``, ``lr=0.0015`` given so the lr search is skipped); and a multi-label
  CSV (``image,labels``, labels ``odd`` / ``big`` = digit odd / digit >= 5) built from the
  digits images written as 8x8 PNG files. Recorded per run: the command, result.json's
  ``final`` and ``best``, the wall seconds, and a sha256 of ``classifier.safetensors``'s tensors
  (so an exact match can be checked, not only the accuracy). ``summary`` holds mean and sd over
  the seeds.

Every finetune command sets ``warmup_epochs=1`` and an explicit lr (0.01 per 256 for the
ResNet-10 runs, 0.001 for the DeiT student; BiT's own 0.0015): with keel's defaults (5 warm-up
epochs, lr 2.5e-4) the 5-epoch runs stay at chance accuracy (8.9% top1 measured), a weak signal.

Rerun (the BEFORE record was made from a pristine worktree of commit 949021a):

    PYTHONPATH=/tmp/keel-before/src python benchmarks/loop_parity.py --part all \\
        --out benchmarks/results/loop_parity_before.json --work /tmp/parity-before
    PYTHONPATH=src python benchmarks/loop_parity.py --part all \\
        --out benchmarks/results/loop_parity_after.json --work /tmp/parity-after

A part run alone is merged into an existing ``--out`` file (the other part is kept);
``--only NAME ...`` restricts a part to some methods / finetune configs (merged per entry).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["simclr", "swav", "mae", "simmim", "dino", "mocov3", "byol", "simsiam", "rotation"]
SSL_MODEL = "vit_tiny_patch4_32"
SSL_STEPS = 20
SSL_BATCH = 64

# name -> flat finetune keys (without seed, device, --out); "{teacher}" and "{csv}" are filled in
FINETUNE = {
    "full": ["backbone=random:resnet10_cifar", "source=digits", "epochs=5", "warmup_epochs=1", "lr=0.01"],
    "linear": ["backbone=random:resnet10_cifar", "source=digits", "epochs=5", "warmup_epochs=1", "lr=0.01", "mode=linear"],
    "deit_distill": ["backbone=random:deit_tiny_distilled_patch16", "source=digits", "img_size=32", "epochs=4",
                     "warmup_epochs=1", "lr=0.001", "recipe=deit", "teacher={teacher}", "distill=hard"],
    "bit": ["backbone=random:resnetv2_14_tiny_cifar", "source=digits", "recipe=bit", "recipe_max_side=16",
            "lr=0.0015", "eval_every=30"],
    "multilabel": ["backbone=random:resnet10_cifar", "source={csv}", "epochs=5", "warmup_epochs=1", "lr=0.01"],
}
# the teacher of deit_distill: one run, seed 0, made before the students
TEACHER = ["backbone=random:resnet10_cifar", "source=digits", "epochs=5", "warmup_epochs=1", "lr=0.01"]


def keel_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "keel", *args]


def run(cmd: list[str], log: Path, cwd: Path) -> float:
    """Run ``cmd``, output to ``log``; raise on failure. Returns the wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=os.environ.copy())
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n--- {log} tail ---\n{tail}")
    return seconds


def tensors_sha256(path: Path) -> str:
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def environment() -> dict:
    probe = subprocess.run([sys.executable, "-c", "import keel, torch; print(keel.__file__); print(torch.__version__);"
                            " print(torch.get_num_threads())"], capture_output=True, text=True, env=os.environ.copy())
    keel_file, torch_version, threads = (probe.stdout.split("\n") + ["", "", ""])[:3]
    rev = subprocess.run(["git", "-C", str(Path(keel_file).parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(Path(keel_file).parent), "status", "--porcelain", "--", "."],
                           capture_output=True, text=True)
    return {"keel_file": keel_file, "git_head": rev.stdout.strip(), "src_dirty": bool(dirty.stdout.strip()),
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "python": sys.version.split()[0],
            "torch": torch_version, "torch_threads": threads, "cpus": os.cpu_count(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# ------------------------------------------------------------------ ssl

def ssl_command(method: str, out_dir: Path, run_name: str) -> list[str]:
    return keel_cmd("pretrain", f"method.name={method}", f"model.name={SSL_MODEL}", "data.source=digits",
                    "train.device=cpu", "train.seed=0", f"train.max_steps={SSL_STEPS}", "train.log_every=1",
                    "train.knn_every=0", f"train.batch_size={SSL_BATCH}", f"train.run_name={run_name}",
                    f"train.out_dir={out_dir}")


def ssl_once(method: str, work: Path, repeat: int) -> dict:
    out_dir = work / "ssl" / f"rep{repeat}"
    run_dir = out_dir / method
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cmd = ssl_command(method, out_dir, method)
    seconds = run(cmd, out_dir / f"{method}.log", work)
    losses = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            losses.append(rec["loss"])
    return {"command": shlex.join(cmd), "run_dir": str(run_dir), "losses": losses,
            "backbone_sha256": tensors_sha256(run_dir / "backbone.safetensors"), "seconds": round(seconds, 2)}


def part_ssl(work: Path, repeats: int, only: list[str] | None) -> dict:
    results = {}
    for method in METHODS:
        if only and method not in only:
            continue
        runs = []
        for r in range(repeats):
            res = ssl_once(method, work, r)
            runs.append(res)
            print(f"ssl {method} rep{r}: {len(res['losses'])} losses, last {res['losses'][-1]!r}, "
                  f"sha {res['backbone_sha256'][:12]}, {res['seconds']:.1f}s", flush=True)
        first = runs[0]
        same = all(r["losses"] == first["losses"] and r["backbone_sha256"] == first["backbone_sha256"] for r in runs)
        results[method] = {"command": first["command"], "losses": first["losses"], "n_losses": len(first["losses"]),
                           "final_loss": first["losses"][-1] if first["losses"] else None,
                           "backbone_sha256": first["backbone_sha256"], "seconds": [r["seconds"] for r in runs],
                           "repeats": repeats, "deterministic": same if repeats > 1 else None,
                           "repeat_hashes": [r["backbone_sha256"] for r in runs]}
        if not same:
            results[method]["repeat_losses"] = [r["losses"] for r in runs]
    return results


# ------------------------------------------------------------------ finetune

def multilabel_csv(work: Path) -> Path:
    """digits (sklearn's 1,797 8x8 images, in its order) as PNG files and a labels CSV:
    ``odd`` when the digit is odd, ``big`` when it is >= 5; a digit 0, 2 or 4 gets ``none``
    (keel's CSV reader does not accept an empty label list)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    folder = work / "multilabel"
    csv = folder / "labels.csv"
    if csv.is_file():
        return csv
    (folder / "img").mkdir(parents=True, exist_ok=True)
    bunch = load_digits()
    rows = ["image,labels"]
    for i, (img, y) in enumerate(zip(bunch.images, bunch.target)):
        name = f"img/{i:04d}.png"
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8), mode="L").save(folder / name)
        labels = [t for t, on in (("odd", y % 2 == 1), ("big", y >= 5)) if on] or ["none"]
        rows.append(f"{name},{';'.join(labels)}")
    csv.write_text("\n".join(rows) + "\n")
    return csv


def finetune_once(name: str, keys: list[str], seed: int, work: Path) -> dict:
    run_dir = work / "finetune" / f"{name}-s{seed}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cmd = keel_cmd("finetune", *keys, f"seed={seed}", "device=cpu", "--out", str(run_dir))
    seconds = run(cmd, work / "finetune" / f"{name}-s{seed}.log", work)
    result = json.loads((run_dir / "result.json").read_text())
    clf = run_dir / "classifier.safetensors"
    return {"command": shlex.join(cmd), "seed": seed, "run_dir": str(run_dir), "seconds": round(seconds, 2),
            "final": result.get("final"), "best": result.get("best"), "main_metric": result.get("main_metric"),
            "steps": result.get("steps"), "epochs": result.get("epochs"),
            "classifier_sha256": tensors_sha256(clf) if clf.is_file() else None}


def _main_value(rec: dict, main: str | None):
    final = rec.get("final") or {}
    if main and main in final:
        return final[main]
    return final.get("top1")


def summarize(runs: list[dict]) -> dict:
    main = runs[0].get("main_metric") or "top1"
    vals = [_main_value(r, main) for r in runs]
    vals = [v for v in vals if isinstance(v, (int, float))]
    secs = [r["seconds"] for r in runs]
    return {"metric": main, "final_mean": statistics.mean(vals) if vals else None,
            "final_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "final_values": vals,
            "seconds_mean": statistics.mean(secs)}


def part_finetune(work: Path, seeds: list[int], only: list[str] | None, save=lambda results: None) -> dict:
    results = {}
    fill = {}
    if not only or "deit_distill" in only or "teacher" in only:
        teacher = finetune_once("teacher", TEACHER, 0, work)
        print(f"finetune teacher s0: final {teacher['final']}, {teacher['seconds']:.1f}s", flush=True)
        results["teacher"] = {"runs": [teacher], "summary": summarize([teacher])}
        fill["teacher"] = teacher["run_dir"]
    if not only or "multilabel" in only:
        fill["csv"] = str(multilabel_csv(work))
    for name, keys in FINETUNE.items():
        if only and name not in only:
            continue
        keys = [k.format(**fill) for k in keys]
        runs = []
        for seed in seeds:
            res = finetune_once(name, keys, seed, work)
            runs.append(res)
            print(f"finetune {name} s{seed}: final {res['final']}, {res['seconds']:.1f}s", flush=True)
        results[name] = {"runs": runs, "summary": summarize(runs)}
        save(results)
    return results


# ------------------------------------------------------------------ main

def table(data: dict) -> str:
    lines = []
    if data.get("ssl"):
        lines.append(f"{'method':10} {'final loss':>20} {'backbone sha256':>14} {'determ.':>8} {'s':>6}")
        for m, r in data["ssl"].items():
            lines.append(f"{m:10} {r['final_loss']!r:>20} {r['backbone_sha256'][:12]:>14} "
                         f"{str(r['deterministic']):>8} {r['seconds'][0]:6.1f}")
    if data.get("finetune"):
        lines.append("")
        lines.append(f"{'finetune':14} {'metric':>8} {'final mean ± sd':>18} {'s/run':>7}  values")
        for name, r in data["finetune"].items():
            s = r["summary"]
            mean = f"{s['final_mean']:.2f} ± {s['final_sd']:.2f}" if s["final_mean"] is not None else "n/a"
            vals = ", ".join(f"{v:.2f}" for v in s["final_values"])
            lines.append(f"{name:14} {s['metric']:>8} {mean:>18} {s['seconds_mean']:7.1f}  {vals}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["ssl", "finetune", "all"], default="all")
    ap.add_argument("--out", required=True, help="JSON file (merged into when it exists)")
    ap.add_argument("--work", required=True, help="folder for the runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="finetune seeds")
    ap.add_argument("--ssl-repeats", type=int, default=2, help="runs per method, to check determinism")
    ap.add_argument("--only", nargs="+", help="only these methods / finetune configs")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.is_file() else {}
    env = environment()
    print(f"keel from {env['keel_file']} (HEAD {env['git_head'][:7]}{', src dirty' if env['src_dirty'] else ''})",
          flush=True)
    data.setdefault("env", {})[args.part] = env
    data["settings"] = {"ssl": {"model": SSL_MODEL, "steps": SSL_STEPS, "batch_size": SSL_BATCH, "methods": METHODS},
                        "finetune": {"configs": FINETUNE, "teacher": TEACHER, "seeds": args.seeds}}
    if args.part in ("ssl", "all"):
        data.setdefault("ssl", {}).update(part_ssl(work, args.ssl_repeats, args.only))
        out.write_text(json.dumps(data, indent=1) + "\n")
    if args.part in ("finetune", "all"):
        def save(results):      # after each config, so that a crash keeps what finished
            data.setdefault("finetune", {}).update(results)
            out.write_text(json.dumps(data, indent=1) + "\n")
        data.setdefault("finetune", {}).update(part_finetune(work, args.seeds, args.only, save))
        out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
