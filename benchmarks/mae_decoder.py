"""MAE's decoder on a small ViT: the old fixed 8 x 512 decoder against the default scaled from the
encoder (``keel.tasks.ssl.mae.default_decoder``), on ``vit_tiny_patch4_32`` at 32 px.

The data is a folder of 4,000 Fashion-MNIST training images (PNG, one sub-folder per class, the
first 4,000 of a seeded draw), written once under ``--root``. Every run is the issue's command,
``keel pretrain method.name=mae model.name=vit_tiny_patch4_32 data.source=<folder>``, in a fresh
process, one at a time; "old" adds ``method.decoder_dim=512 method.decoder_depth=8
method.decoder_heads=16``, "new" adds nothing.

* speed: ``--speed-steps`` steps of each (``train.log_every=1``, kNN monitor off); img/s is the
  median of the trainer's per-step ``img_per_s`` over the steps after the first, parameters are
  counted on the method built by the same config.
* accuracy: ``--epochs`` epochs per seed (defaults otherwise, kNN monitor included), the process's
  wall seconds, then ``keel eval all`` of the exported backbone on the same folder (kNN and linear
  probe; the folder's every 5th image is the test split).

    python benchmarks/mae_decoder.py --phase speed --speed-steps 6
    python benchmarks/mae_decoder.py --phase accuracy --epochs 3 --seeds 0 --which old
    python benchmarks/mae_decoder.py --phase accuracy --epochs 3 --seeds 0,1,2 --which new

Results are merged into ``benchmarks/results/mae_decoder.json`` (one key per phase and run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OLD = ["method.decoder_dim=512", "method.decoder_depth=8", "method.decoder_heads=16"]
BASE = ["method.name=mae", "model.name=vit_tiny_patch4_32"]
RESULTS = Path(__file__).parent / "results" / "mae_decoder.json"


def make_folder(folder: Path, n: int = 4000, img_size: int = 32) -> Path:
    """``n`` Fashion-MNIST training images as PNGs under ``folder/<class>/``; kept if already there."""
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == n:
        return folder
    from PIL import Image

    from keel.data.sources import build_dataset
    ds = build_dataset("fashion-mnist", "train", img_size, subset=n, seed=0)
    for i in range(len(ds)):
        label = int(ds.labels[i])
        sub = folder / f"{label}_{ds.classes[label].replace('/', '-')}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(sub / f"{i:05d}.png")
    return folder


def run(cmd: list[str]) -> float:
    """Run a command, its output to ours; -> wall seconds."""
    print("$", " ".join(cmd), f"  (load average before: {os.getloadavg()[0]:.1f})", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def count_params(extra: list[str]) -> dict:
    import keel
    from keel.config import load_config
    from keel.models.registry import model_kwargs
    from keel.tasks.ssl import build_method
    cfg = load_config(overrides=BASE + extra)
    backbone = keel.create_model(cfg.model.name, **model_kwargs(cfg))
    m = build_method("mae", backbone, cfg)
    dec = m.decoder
    return {"encoder": sum(p.numel() for p in backbone.parameters()),
            "decoder": sum(p.numel() for p in dec.parameters()),
            "decoder_shape": {"dim": dec.embed.out_features, "depth": len(dec.blocks),
                              "heads": m.used["decoder_heads"]},
            "used": dict(m.used)}


def speed(folder: Path, root: Path, steps: int) -> dict:
    out = {}
    for which, extra in (("old", OLD), ("new", [])):
        run_dir = root / "runs" / f"speed-{which}"
        cmd = ["keel", "pretrain", *BASE, f"data.source={folder}", *extra, f"train.max_steps={steps}",
               "train.log_every=1", "train.knn_every=0", f"train.out_dir={root / 'runs'}",
               f"train.run_name=speed-{which}"]
        if run_dir.exists():
            subprocess.run(["rm", "-r", str(run_dir)], check=True)
        load = os.getloadavg()[0]
        wall = run(cmd)
        lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
        ips = [r["img_per_s"] for r in lines if "img_per_s" in r]
        out[which] = {"command": " ".join(cmd), "steps": steps, "wall_s": round(wall, 1), "load_avg_before": load,
                      "img_per_s_each_step": ips, "img_per_s": statistics.median(ips[1:]),
                      "s_per_step": round(256 / statistics.median(ips[1:]), 2), "params": count_params(extra)}
    out["ratio_new_over_old"] = round(out["new"]["img_per_s"] / out["old"]["img_per_s"], 2)
    return out


def accuracy(folder: Path, root: Path, which: str, epochs: int, seed: int) -> dict:
    extra = OLD if which == "old" else []
    name = f"acc-{which}-e{epochs}-s{seed}"
    run_dir = root / "runs" / name
    if run_dir.exists():
        subprocess.run(["rm", "-r", str(run_dir)], check=True)
    cmd = ["keel", "pretrain", *BASE, f"data.source={folder}", *extra, f"train.epochs={epochs}",
           f"train.seed={seed}", f"train.out_dir={root / 'runs'}", f"train.run_name={name}"]
    load = os.getloadavg()[0]
    wall = run(cmd)
    res_file = root / f"{name}.eval.json"
    ecmd = ["keel", "eval", "all", f"model.backbone={run_dir}", f"data.source={folder}", f"eval.json={res_file}"]
    eval_wall = run(ecmd)
    card = json.loads((run_dir / "card.json").read_text())
    return {"command": " ".join(cmd), "eval_command": " ".join(ecmd), "wall_s": round(wall, 1), "load_avg_before": load,
            "eval_wall_s": round(eval_wall, 1), "final_loss": card["metrics"]["final_loss"],
            "eval": json.loads(res_file.read_text()),
            "decoder_used": {k: v for k, v in card["config"]["method"].items() if k.startswith("decoder_")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["speed", "accuracy"], required=True)
    ap.add_argument("--root", default="/tmp/keel-mae-decoder")
    ap.add_argument("--speed-steps", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--which", default="old,new")
    args = ap.parse_args()
    root = Path(args.root)
    folder = make_folder(root / "fashion-4k")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("meta", {}).update({
        "machine": f"2-core CPU (shared), {os.cpu_count()} logical CPUs visible", "python": sys.version.split()[0],
        "data": "4,000 Fashion-MNIST train images (seeded subset, seed 0) as 32 px PNGs, class sub-folders; "
                "eval: every 5th image held out (3,200 train / 800 test)"})
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)

    def save(key: str, value: dict) -> None:
        # re-read first: another invocation may have written its runs meanwhile
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        data["meta"] = {**data.get("meta", {}), **results["meta"]}
        if key == "speed":
            data["speed"] = value
        else:
            data.setdefault("accuracy", {})[key] = value
        RESULTS.write_text(json.dumps(data, indent=2) + "\n")
        results.update(data)

    if args.phase == "speed":
        save("speed", {"date": stamp, **speed(folder, root, args.speed_steps)})
    else:
        for which in args.which.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                r = accuracy(folder, root, which, args.epochs, seed)
                save(f"{which}-e{args.epochs}-s{seed}", {"date": stamp, **r})
    print(json.dumps({k: v for k, v in results.items() if k != "meta"}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
