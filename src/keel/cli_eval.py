"""``keel eval``: frozen-feature protocols, few-shot and the suite, configured like every other
command (``section.key=value``; the flags of keel 0.1 still work this release)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from keel.config import ConfigError, EvalJobConfig, load_config

EVAL_EPILOG = """\
protocols:
  knn      cosine kNN with temperature-weighted votes (eval.knn_k, eval.knn_t), top-1 and top-5
  linear   a linear classifier trained on frozen, cached features (eval.linear_epochs)
  all      both
  fewshot  eval.shots labeled images per class, eval.draws random draws, mean +- std of kNN and
           linear probe (eval.fewshot_finetune=true adds the fine-tune protocol)
  zeroshot a keel clip train run (model.backbone) classifies by prompts: class names x templates
           (eval.templates, eval.classes), top-1/top-5 on data.source's test split; no image label used
  retrieval  a keel clip train run: recall@1/5/10 image->text and text->image on image-text pairs
           (data.source: a folder with a .txt beside each image, or a CSV with image and text columns)
  suite    several backbones side by side on several datasets (model.backbone=[A,B], data.source=[X,Y]):
           kNN, linear probe, few-shot, a short fine-tuning (eval.finetune_epochs, or eval.hyperrule=true
           for BiT-HyperRule's schedule, eval.hyperrule_scale=0.1 for a tenth of it) and robustness to
           noise/blur/contrast/JPEG (eval.severity); writes report.md, report.json and PNGs into
           eval.out; eval.label_fractions=[0.01,0.1,1] adds linear probe and fine-tuning on 1%, 10%
           and 100% of the training labels (class-balanced, the same images for every backbone)

model.backbone: a run directory (pretraining or fine-tuning), a .safetensors file with its card.json,
timm:<model>:<file> or random:<model>. data.img_size: 0 (default) = the size the backbone was trained
at (random:/timm: the model's own). The same run.seed gives the same numbers.

examples:
  keel eval knn model.backbone=runs/my-run data.source=digits
  keel eval all model.backbone=runs/my-run/backbone.safetensors data.source=fashion-mnist data.img_size=32
  keel eval linear model.backbone=random:resnet10_cifar data.source=digits     # an untrained baseline
  keel eval fewshot model.backbone=runs/my-run data.source=fashion-mnist eval.shots=[1,5,10] eval.draws=5
  keel eval suite model.backbone=[runs/run-a,runs/run-b,random:resnet18_cifar] data.source=[digits,fashion-mnist] \\
      eval.shots=[1,5,10] eval.finetune_epochs=5 eval.out=runs/suite
  keel eval zeroshot model.backbone=runs/clip-<run> data.source=fashion-mnist eval.templates=prompts.txt
  keel eval retrieval model.backbone=runs/clip-<run> data.source=held-out-pairs.csv
  keel eval knn model.backbone=runs/my-run data.source=path/to/labeled   # one sub-folder per class;
                                                                        # train/ + test/ inside, or every
                                                                        # 5th image is held out as test

configuration: defaults < the YAML file given with -c < section.key=value. Keys and defaults:
{keys}"""

# keel 0.1's flags -> the keys they set now
FLAGS = {"checkpoint": "model.backbone", "data": "data.source", "img_size": "data.img_size", "k": "eval.knn_k",
         "temperature": "eval.knn_t", "epochs": "eval.linear_epochs", "device": "run.device", "seed": "run.seed",
         "json": "eval.json", "shots": "eval.shots", "draws": "eval.draws", "finetune": "eval.fewshot_finetune",
         "out": "eval.out", "protocols": "eval.protocols", "finetune_epochs": "eval.finetune_epochs",
         "hyperrule": "eval.hyperrule", "hyperrule_scale": "eval.hyperrule_scale", "severity": "eval.severity",
         "label_fractions": "eval.label_fractions"}


def add_parser(sub, keys: str, fmt) -> None:
    ev = sub.add_parser("eval", help="kNN / linear probe / few-shot / suite of a backbone on frozen features",
                        description="Evaluate a backbone's frozen features on a labeled dataset.",
                        epilog=EVAL_EPILOG.format(keys=keys), formatter_class=fmt)
    ev.add_argument("protocol", choices=["knn", "linear", "all", "fewshot", "suite", "zeroshot", "retrieval"])
    ev.add_argument("-c", "--config", help="YAML config file (see the keys below)")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.backbone=runs/my-run eval.knn_k=[10]")
    old = ev.add_argument_group("keel 0.1 flags (deprecated: use the keys above)")
    for flag in ("checkpoint", "data", "k", "shots", "protocols", "label_fractions"):
        old.add_argument("--" + flag.replace("_", "-"), nargs="+", default=None, help=argparse.SUPPRESS)
    for flag in ("finetune", "hyperrule"):
        old.add_argument("--" + flag, action="store_const", const=True, default=None, help=argparse.SUPPRESS)
    for flag in ("img_size", "temperature", "epochs", "device", "seed", "json", "draws", "out", "finetune_epochs",
                 "hyperrule_scale", "severity"):
        old.add_argument("--" + flag.replace("_", "-"), default=None, help=argparse.SUPPRESS)


def config_from_args(args) -> EvalJobConfig:
    given = {f: getattr(args, f) for f in FLAGS if getattr(args, f, None) is not None}
    overrides = list(args.overrides)
    if given:
        print("keel: deprecated flags (they stop working in the next release): "
              + ", ".join(f"--{f.replace('_', '-')} -> {FLAGS[f]}" for f in given), file=sys.stderr)
        for flag, value in given.items():
            text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value).lower() \
                if isinstance(value, bool) else str(value)
            overrides.insert(0, f"{FLAGS[flag]}={text}")
    return load_config(args.config, overrides, cls=EvalJobConfig)


def cmd_eval(args) -> int:
    cfg = config_from_args(args)
    if not cfg.model.backbone:
        raise ConfigError("model.backbone is not set: a run directory, a .safetensors file, timm:<model>:<file> "
                          "or random:<model>")
    if args.protocol == "suite":
        return _suite(cfg)
    if cfg.eval.label_fractions:
        raise ValueError(f"eval.label_fractions is for `keel eval suite`, not `keel eval {args.protocol}`")
    for key, values in (("model.backbone", cfg.model.backbone), ("data.source", cfg.data.source)):
        if len(values) != 1:
            raise ValueError(f"{key} takes one value for `keel eval {args.protocol}` (several only for suite)")
    if args.protocol in ("zeroshot", "retrieval"):
        return _image_text(args.protocol, cfg)
    import torch

    from keel import hub
    from keel.data.sources import labeled_splits
    from keel.engine.distributed import resolve_device
    from keel.evaluate.frozen import evaluate_frozen
    spec, source = cfg.model.backbone[0], cfg.data.source[0]
    torch.manual_seed(cfg.run.seed)
    backbone, size = hub.resolve_backbone(spec, cfg.data.img_size or None, seed=cfg.run.seed)
    train, test = labeled_splits(source, size)
    device = resolve_device(cfg.run.device)
    print(f"eval {args.protocol} · {spec} at {size} px · {source}: {len(train)} train / {len(test)} test images")
    if args.protocol == "fewshot":
        return _fewshot(cfg, backbone.to(device), train, test, size, device)
    protocols = ("knn", "linear") if args.protocol == "all" else (args.protocol,)
    res = evaluate_frozen(backbone.to(device), train, test, size, device, protocols=protocols, ks=cfg.eval.knn_k,
                          temperature=cfg.eval.knn_t, linear_epochs=cfg.eval.linear_epochs, progress=True,
                          amp_dtype=torch.bfloat16 if device.type == "cuda" else None)
    for k, v in res.items():
        print(f"  {k:<18} {v:6.2f}")
    if cfg.eval.json:
        Path(cfg.eval.json).write_text(json.dumps(res, indent=2))
    return 0


def _image_text(protocol: str, cfg) -> int:
    from keel.engine.distributed import resolve_device
    from keel.evaluate import zeroshot as Z
    from keel.jobs.clip import is_clip_run
    run, source, device = cfg.model.backbone[0], cfg.data.source[0], resolve_device(cfg.run.device)
    if not is_clip_run(run):
        raise ConfigError(f"keel eval {protocol} needs a keel clip train run as model.backbone; '{run}' has no clip.json")
    if protocol == "zeroshot":
        res = Z.zeroshot_from_run(run, source, cfg.eval.templates, cfg.eval.classes, "test", device)
        print(Z.describe_zeroshot(res))
    else:
        res = Z.retrieval_from_run(run, source, device)
        print(Z.describe_retrieval(res))
    if cfg.eval.json:
        Path(cfg.eval.json).write_text(json.dumps(res, indent=2))
    return 0


def _fewshot(cfg, backbone, train, test, size, device) -> int:
    from keel.evaluate.fewshot import fewshot
    protocols = ("knn", "linear", "finetune") if cfg.eval.fewshot_finetune else ("knn", "linear")
    e = cfg.eval
    res = fewshot(backbone, train, test, shots=e.shots, draws=e.draws, protocols=protocols, img_size=size,
                  knn_k=min(e.knn_k), knn_t=e.knn_t, device=str(device), progress=True, seed=cfg.run.seed)
    print(f"few-shot top-1 (%), mean +- std over {e.draws} draws")
    print("  shots  " + "".join(f"{p:>16}" for p in protocols))
    for n in e.shots:
        print(f"  {n:>5}  " + "".join(f"{res[p][n]['mean']:>9.2f} +-{res[p][n]['std']:>5.2f}" for p in protocols))
    if e.json:
        Path(e.json).write_text(json.dumps(res, indent=2))
    return 0


def _suite(cfg) -> int:
    from keel.evaluate.suite import run_suite
    e = cfg.eval
    out = Path(e.out) if e.out else Path("runs") / f"suite-{time.strftime('%Y%m%d-%H%M%S')}"
    report = run_suite(cfg.model.backbone, cfg.data.source, out, shots=e.shots, draws=e.draws,
                       finetune_epochs=e.finetune_epochs, img_size=cfg.data.img_size or None, protocols=e.protocols,
                       device=cfg.run.device, progress=True, seed=cfg.run.seed, knn_ks=e.knn_k, knn_t=e.knn_t,
                       linear_epochs=e.linear_epochs,
                       fewshot_protocols=("knn", "linear", "finetune") if e.fewshot_finetune else ("knn", "linear"),
                       finetune_recipe="hyperrule" if e.hyperrule else "short",
                       hyperrule_scale=e.hyperrule_scale, severity=e.severity, label_fractions=e.label_fractions)
    text = (out / "report.md").read_text()
    blocks = [b for b in text.split("\n\n") if not b.startswith("![")]
    print("\n" + "\n\n".join(blocks))
    print(f"wrote {out / 'report.md'}, {out / 'report.json'} and "
          f"{sum(len(f) for f in report['files']['figures'].values())} PNGs")
    if e.json:
        Path(e.json).write_text((out / "report.json").read_text())
    return 0
