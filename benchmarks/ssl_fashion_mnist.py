"""SimCLR on Fashion-MNIST: pretrain on the train split, evaluate on the 10k test images.

Reports kNN (k=200, t=0.1, cosine; also k=20) and linear-probe top-1 for the pretrained backbone,
the same backbone at random init, and raw pixels, plus the training wall time.

    python benchmarks/ssl_fashion_mnist.py --preset cpu     # 2 CPU cores, ~15 min
    python benchmarks/ssl_fashion_mnist.py --preset gpu     # one GPU: ResNet-18, full train split
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from keel.config import load_config
from keel.data.sources import build_dataset
from keel.engine.checkpoint import load_backbone
from keel.engine.distributed import resolve_device
from keel.jobs.pretrain import pretrain
from keel.models.registry import model_kwargs
from keel.evaluate.frozen import evaluate_frozen
from keel.evaluate.knn import knn_eval
from keel.evaluate.linear import linear_probe
from keel.models.registry import create_model

PRESETS = {
    # A reduced run for 2 CPU cores: small net, 10k-image subset, 24 px.
    "cpu": ["model.name=resnet10_cifar", "data.img_size=24", "data.subset=10000", "train.epochs=10",
            "train.batch_size=256", "train.lr=4e-3", "method.temperature=0.1", "train.knn_every=2",
            "train.knn_subset=2000", "aug.scale_min=0.3", "aug.hue=0.0", "eval.linear_epochs=50"],
    # The GPU protocol: CIFAR-style ResNet-18, batch 512, 30 epochs, the full 60k.
    # Same optimizer settings as the measured CPU preset (AdamW, 4e-3 effective lr, t = 0.1).
    "gpu": ["model.name=resnet18_cifar", "data.img_size=32", "train.epochs=30", "train.batch_size=512",
            "train.lr=2e-3", "method.temperature=0.1", "train.warmup_epochs=2", "train.knn_every=5",
            "aug.scale_min=0.3", "aug.hue=0.0", "train.compile=true"],
}


def raw_pixels(device) -> dict:
    """The no-learning baseline: flattened 28x28 pixels, same kNN and linear protocols."""
    tr, te = build_dataset("fashion-mnist", "train", 28), build_dataset("fashion-mnist", "test", 28)
    xtr = tr.images[:, 0].flatten(1).float() / 255
    xte = te.images[:, 0].flatten(1).float() / 255
    out = knn_eval(xtr, tr.labels, xte, te.labels, ks=(20, 200), temperature=0.1)
    out.update(linear_probe(xtr, tr.labels, xte, te.labels, epochs=50, device=device))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", default="runs/bench-fashion-mnist")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. train.epochs=4")
    args = ap.parse_args()

    cfg = load_config(None, ["data.source=fashion-mnist", *PRESETS[args.preset], *args.overrides])
    run_dir = Path(args.out) / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    result = pretrain(cfg, run_dir)
    train_s = time.perf_counter() - t0

    size = cfg.data.img_size
    train, test = build_dataset("fashion-mnist", "train", size), build_dataset("fashion-mnist", "test", size)
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(cfg.train.seed)
    rows = {}
    for name, bb in [("keel SimCLR", load_backbone(run_dir)),
                     ("random init", create_model(cfg.model.name, **model_kwargs(cfg)))]:
        rows[name] = evaluate_frozen(bb.to(device), train, test, size, device, ks=(20, 200), temperature=0.1,
                                     linear_epochs=cfg.eval.linear_epochs, amp_dtype=amp, progress=True)
    rows["raw pixels"] = raw_pixels(device)

    report = {"preset": args.preset, "config_overrides": PRESETS[args.preset] + args.overrides,
              "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
              "train_seconds": round(train_s, 1), "train_images": result.get("steps", 0) * cfg.train.batch_size,
              "rows": rows, "run_dir": str(run_dir)}
    (run_dir / "benchmark.json").write_text(json.dumps(report, indent=2))
    print(f"\nFashion-MNIST, {args.preset} preset, pretraining {train_s:.0f} s on {report['device']}")
    print(f"| backbone | kNN@200 | kNN@20 | linear |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['knn_top1@200']:.2f} | {r['knn_top1@20']:.2f} | {r['linear_top1']:.2f} |")


if __name__ == "__main__":
    main()
