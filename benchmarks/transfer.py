"""Transfer figures of the supervised side, each a comparison measured in one run.

1. labels:  an SSL-pretrained backbone fine-tuned vs the same backbone from scratch, on Fashion-MNIST
            with 1% and 10% of the training labels (class-balanced, seeded), full test set.
2. distill: a small DeiT student (distillation token) with hard distillation from a CNN teacher vs
            the same student without distillation, same budget, on digits.
3. hyperrule: `recipe=bit` (BiT-HyperRule, no hand-set hyper-parameters: the lr is chosen on
            held-out training images) vs a manual sweep of learning rates scored on the test split,
            at the same resolution, on digits; BiT's fixed lr is one of the sweep's. BiT's own setting is
            `--hyperrule-backbone bit-upstream:resnetv2_14_tiny_cifar`: a GN+WS ResNet-v2 first trained
            upstream on Fashion-MNIST (`recipe=bit-upstream`), then transferred by the rule.

    python benchmarks/transfer.py --ssl runs/<a fashion-mnist pretraining run>      # 2 CPU cores
    python benchmarks/transfer.py --ssl RUN --only labels --fractions 0.01 0.1 --epochs 20 5
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from keel import hub
from keel.config import FinetuneConfig, override
from keel.data.sources import build_dataset
from keel.evaluate.suite import sample_fraction
from keel.jobs.finetune import finetune, run_finetune
from keel.models.registry import create_model
from keel.recipes.lr_search import search_lr
from keel.recipes.supervised import bit_recipe


def top1(res: dict) -> float:
    return res["final"]["top1"]


def config(values: dict) -> FinetuneConfig:
    """The default fine-tuning config with ``{"section.key": value}`` set."""
    return override(FinetuneConfig(), values)


def load(spec: str, size: int, seed: int = 0) -> torch.nn.Module:
    return hub.resolve_backbone(spec, size, seed=seed)[0]


def labels_experiment(ssl: str, fractions: list[float], epochs: list[int], size: int, out: Path) -> list[dict]:
    train = build_dataset("fashion-mnist", "train", size, labeled=True)
    test = build_dataset("fashion-mnist", "test", size, labeled=True)
    rows = []
    for frac, ep in zip(fractions, epochs):
        sub = train.subset(sample_fraction(train.labels, frac, seed=0))   # the suite's --label-fractions subset
        cfg = config({"data.img_size": size, "train.epochs": ep, "train.warmup_epochs": min(5.0, ep / 5),
                      "train.lr": 2e-3, "train.eval_every": 0, "train.batch_size": 128, "train.device": "auto",
                      "data.num_workers": 0})
        for name, spec in (("ssl", ssl), ("scratch", "random:" + _model_of(ssl))):
            torch.manual_seed(0)
            t = time.time()
            res = finetune(load(spec, size), sub, test, cfg, run_dir=out / f"labels-{frac}-{name}", progress=False)
            rows.append({"experiment": "labels", "fraction": frac, "images": len(sub), "epochs": ep, "init": name,
                         "top1": top1(res), "seconds": round(time.time() - t, 1)})
            print(rows[-1], flush=True)
    return rows


def _model_of(run: str) -> str:
    from keel.engine.checkpoint import read_card
    return read_card(run)[1]["model"]


def distill_experiment(epochs: int, kinds: list[str], out: Path) -> list[dict]:
    size = 16
    train = build_dataset("digits", "train", size, labeled=True)
    test = build_dataset("digits", "test", size, labeled=True)
    base = config({"data.img_size": size, "train.epochs": epochs, "train.eval_every": 0, "train.batch_size": 128,
                   "train.device": "auto", "data.num_workers": 0, "task.label_smoothing": 0.1,
                   "model.drop_path_rate": 0.0})
    torch.manual_seed(0)
    t = time.time()
    teacher_res = finetune(create_model("resnet10_cifar"), train, test, override(base, {"train.lr": 4e-3}),
                           run_dir=out / "distill-teacher", progress=False)
    rows = [{"experiment": "distill", "model": "teacher resnet10_cifar", "top1": top1(teacher_res),
             "seconds": round(time.time() - t, 1)}]
    print(rows[-1], flush=True)
    teacher = teacher_res["classifier"].eval()
    student = dict(img_size=size, depth=4, dim=96, num_heads=3, patch_size=4)
    for kind in kinds:
        torch.manual_seed(0)
        t = time.time()
        res = finetune(create_model("deit_tiny_distilled_patch16", **student), train, test,
                       override(base, {"train.lr": 1e-3, "distill.kind": kind}), run_dir=out / f"distill-{kind}",
                       progress=False,
                       teacher=None if kind == "none" else teacher)
        rows.append({"experiment": "distill", "model": f"deit student, distill={kind}", "top1": top1(res),
                     "seconds": round(time.time() - t, 1)})
        print(rows[-1], flush=True)
    return rows


def bit_upstream(model: str, epochs: int, size: int, out: Path) -> tuple[str, dict]:
    """BiT upstream: ``model`` trained from scratch on all of Fashion-MNIST with ``recipe=bit-upstream``;
    returns the run directory (a backbone spec for the downstream runs) and its row."""
    cfg = config({"model.backbone": f"random:{model}", "data.source": "fashion-mnist", "recipe.name": "bit-upstream",
                  "data.img_size": size, "train.epochs": epochs, "train.batch_size": 256, "train.eval_every": 0,
                  "train.device": "auto", "data.num_workers": 0})
    t = time.time()
    res = run_finetune(cfg, run_dir=out / "bit-upstream", progress=False)
    row = {"experiment": "hyperrule", "run": f"bit-upstream {model} on fashion-mnist", "epochs": epochs,
           "top1": top1(res), "seconds": round(time.time() - t, 1)}
    print(row, flush=True)
    return str(out / "bit-upstream"), row


def hyperrule_experiment(side: int, scale: float, lrs: list[float] | None, backbone: str, out: Path) -> list[dict]:
    """keel's ``recipe=bit`` (the rule, its lr chosen on held-out training images) against a manual
    sweep of the lr scored on the test split, and BiT's fixed lr (0.0015 per 256) among the sweep."""
    asked = config({"model.backbone": backbone, "data.source": "digits", "recipe.name": "bit",
                    "recipe.max_side": side, "train.device": "auto", "train.eval_every": 0, "data.num_workers": 0})
    # the rule reads the training set's size (and digits' own 8 px side)
    rule = bit_recipe(asked, build_dataset("digits", "train", 8, labeled=True), progress=True)
    rule = override(rule, {"train.epochs": max(1, round(rule.train.epochs * scale))})
    size = rule.data.img_size
    train = build_dataset("digits", "train", size, labeled=True)
    test = build_dataset("digits", "test", size, labeled=True)
    rows = []

    def run(name: str, cfg: FinetuneConfig, t: float, **extra) -> None:
        torch.manual_seed(0)
        res = finetune(load(backbone, size), train, test, cfg, run_dir=out / f"hyperrule-{name}", progress=False)
        rows.append({"experiment": "hyperrule", "run": name, "backbone": backbone, "lr": cfg.train.lr,
                     "epochs": cfg.train.epochs, "top1": top1(res), "seconds": round(time.time() - t, 1), **extra})
        print(rows[-1], flush=True)

    def candidate(cfg, fit, held, objective, run_dir, resume):
        # as run_finetune trains each candidate: a fresh backbone at the run's seed
        return finetune(load(backbone, size, seed=cfg.train.seed), fit, held, cfg, task=objective, run_dir=run_dir,
                        progress=False, resume=resume)

    t = time.time()
    chosen, record = search_lr(rule, train, None, out / "hyperrule-recipe-bit", candidate, progress=False)
    run("recipe-bit", chosen, t, search=record["scores"], holdout=record["holdout"])
    for lr in lrs or rule.recipe.lr_search:
        run(f"manual lr={lr:g}" + (" (BiT's fixed lr)" if lr == 0.0015 else ""),
            override(rule, {"train.lr": lr, "recipe.lr_search": []}), time.time())
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ssl", help="an SSL pretraining run on fashion-mnist (for the labels experiment)")
    ap.add_argument("--only", choices=["labels", "distill", "hyperrule"], nargs="+",
                    default=["labels", "distill", "hyperrule"])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--epochs", type=int, nargs="+", default=[20, 5], help="labels experiment epochs, one per fraction")
    ap.add_argument("--size", type=int, default=24, help="labels experiment image side")
    ap.add_argument("--distill-epochs", type=int, default=15)
    ap.add_argument("--distill-kinds", nargs="+", default=["none", "hard"], choices=["none", "hard", "soft"])
    ap.add_argument("--hyperrule-side", type=int, default=16, help="cap of the HyperRule resolution")
    ap.add_argument("--hyperrule-scale", type=float, default=0.1, help="fraction of the HyperRule's epochs run")
    ap.add_argument("--hyperrule-backbone", default="random:resnet10_cifar",
                    help="what the HyperRule and the sweep fine-tune: a run, random:MODEL, or bit-upstream:MODEL "
                         "(MODEL trained upstream on Fashion-MNIST first, BiT's setting)")
    ap.add_argument("--upstream-epochs", type=int, default=10, help="bit-upstream: epochs on Fashion-MNIST")
    ap.add_argument("--upstream-size", type=int, default=16, help="bit-upstream: image side upstream")
    ap.add_argument("--lrs", type=float, nargs="+",
                    help="the manual sweep's lrs per 256 (default: recipe=bit's candidates, BiT's 0.0015 among them)")
    ap.add_argument("--out", default=f"runs/bench-transfer/{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if "labels" in args.only:
        if not args.ssl:
            ap.error("the labels experiment needs --ssl RUN")
        if len(args.epochs) != len(args.fractions):
            ap.error("give one --epochs value per --fractions value")
        rows += labels_experiment(args.ssl, args.fractions, args.epochs, args.size, out)
    if "distill" in args.only:
        rows += distill_experiment(args.distill_epochs, args.distill_kinds, out)
    if "hyperrule" in args.only:
        backbone = args.hyperrule_backbone
        if backbone.startswith("bit-upstream:"):
            backbone, row = bit_upstream(backbone.split(":", 1)[1], args.upstream_epochs, args.upstream_size, out)
            rows.append(row)
        rows += hyperrule_experiment(args.hyperrule_side, args.hyperrule_scale, args.lrs, backbone, out)
    (out / "transfer.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'transfer.json'}")


if __name__ == "__main__":
    main()
