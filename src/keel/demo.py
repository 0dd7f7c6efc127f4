"""``keel demo``: the whole pipeline on built-in data in a few minutes on a CPU.

Pretrain with SimCLR on digits, then compare the pretrained backbone with the same backbone at
random init under kNN and a linear probe, and leave a report (table, curves, bars).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from keel.config import load_config
from keel.data.sources import build_dataset
from keel.engine.checkpoint import load_backbone
from keel.engine.distributed import resolve_device
from keel.jobs.pretrain import pretrain
from keel.evaluate.frozen import evaluate_frozen
from keel.models.registry import create_model, model_kwargs
from keel.viz.curves import plot_comparison, plot_run

# Chosen so that the demo ends in about a minute on 2 CPU cores (a small sweep of lr, epochs,
# temperature and crop scale on digits; see BENCHMARKS.md for the figures).
DEMO_DEFAULTS = {
    "data": {"source": "digits", "img_size": 16},
    "model": {"name": "resnet10_cifar"},
    "method": {"name": "simclr", "temperature": 0.1},
    "train": {"epochs": 40, "batch_size": 128, "lr": 8e-3, "warmup_epochs": 2, "knn_every": 5, "log_every": 5},
    "aug": {"scale_min": 0.3, "hue": 0.0},
}


def run_demo(epochs: int | None = None, run_dir: str | None = None, device: str = "auto",
             overrides: list[str] | None = None) -> dict:
    extra = list(overrides or [])
    if epochs:
        extra.append(f"train.epochs={epochs}")
    extra.append(f"train.device={device}")
    cfg = load_config(None, extra, defaults=DEMO_DEFAULTS)
    run_dir = Path(run_dir or Path(cfg.train.out_dir) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.perf_counter()
    result = pretrain(cfg, run_dir)
    t_train = time.perf_counter() - t0

    dev = resolve_device(device)
    size = cfg.data.img_size
    train, test = build_dataset(cfg.data.source, "train", size), build_dataset(cfg.data.source, "test", size)
    torch.manual_seed(cfg.train.seed)
    backbones = {"pretrained (SimCLR)": load_backbone(run_dir),
                 "random init": create_model(cfg.model.name, **model_kwargs(cfg))}
    rows = {}
    for name, bb in backbones.items():
        r = evaluate_frozen(bb.to(dev), train, test, size, dev, ks=tuple(cfg.eval.knn_k),
                            temperature=cfg.eval.knn_t, linear_epochs=cfg.eval.linear_epochs)
        rows[name] = {"kNN@20": r["knn_top1@20"], "kNN@200": r["knn_top1@200"], "linear": r["linear_top1"]}

    print(f"\n{cfg.data.source}: {len(train)} train / {len(test)} test images, top-1 (%)")
    print(f"{'backbone':<22} {'kNN@20':>8} {'kNN@200':>8} {'linear':>8}")
    for name, r in rows.items():
        print(f"{name:<22} {r['kNN@20']:>8.2f} {r['kNN@200']:>8.2f} {r['linear']:>8.2f}")
    report = {"rows": rows, "pretrain_seconds": round(t_train, 1), "total_seconds": round(time.perf_counter() - t0, 1),
              "run_dir": str(run_dir), "final_loss": result["loss"]}
    (run_dir / "demo_report.json").write_text(json.dumps(report, indent=2))
    plot_comparison(rows, run_dir / "demo_accuracy.png", title=f"{cfg.data.source}: pretrained vs random init")
    print(f"\nreport: {run_dir / 'demo_report.json'}, {run_dir / 'demo_accuracy.png'}, {run_dir / 'curves.png'}"
          f"  ({report['total_seconds']:.0f} s in all)")
    return report
