"""The ``keel`` command: one sub-command per stage, each a thin layer over the library."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from keel.cli_clip import add_parser as add_clip_parser
from keel.cli_clip import cmd_clip
from keel.cli_detect import add_parser as add_detect_parser
from keel.cli_deploy import add_parsers as add_deploy_parsers
from keel.cli_deploy import cmd_dedup, cmd_embed, cmd_export, cmd_predict, cmd_search
from keel.cli_shards import add_parser as add_shards_parser
from keel.cli_shards import cmd_shards
from keel.cli_detect import cmd_detect
from keel.cli_eval import add_parser as add_eval_parser
from keel.cli_eval import cmd_eval
from keel.config import ConfigError, EvalJobConfig, RunConfig, load_config

MAIN_HELP = """\
keel pretrains vision backbones on your own images (mostly unlabeled) and measures how well
they transfer.

a 5-minute tour:
  keel demo                                    # pretrain on built-in digits, compare with random init
  keel pretrain data.source=path/to/images     # self-supervised pretraining on your folder
  keel eval knn model.backbone=runs/<run> data.source=fashion-mnist
  keel show neighbors --checkpoint runs/<run> --data digits   # pictures: neighbors, attention, mae
  keel pretrain method.name=swav model.name=keel_tiny         # also mae simmim dino mocov3 byol simsiam rotation
  keel finetune model.backbone=runs/<run> data.source=digits  # fine-tune on labeled data
  keel detect train model.backbone=runs/<run> data.source=boxes.csv   # object detection (ViTDet-style)
  keel clip train data.source=captions.csv && keel clip zeroshot --checkpoint runs/<run> --data digits
  keel shards photos/ shards/photos && keel pretrain data.source=shards:shards/photos   # at scale
  keel embed --checkpoint runs/<run> --data photos/ --out emb/ && keel dedup --index emb/ --threshold 0.95
  keel predict --checkpoint runs/<finetune-run> --data new_photos/   # top-5 classes per image, a CSV
  keel export --checkpoint runs/<run> --format onnx                  # ONNX or torch.export, checked
  keel eval suite model.backbone=[runs/<run>,random:resnet18_cifar] data.source=[digits,fashion-mnist]
  keel models                                  # the backbones you can pretrain

every sub-command has its own --help with examples.
"""

PRETRAIN_EPILOG = """\
examples:
  keel pretrain                                          # SimCLR, ResNet-18 (CIFAR stem), digits
  keel pretrain data.source=fashion-mnist train.epochs=30 train.batch_size=512
  keel pretrain -c my_run.yaml model.name=vit_tiny_patch4_32
  keel pretrain method.name=mae model.name=vit_tiny_patch4_32 model.global_pool=avg   # export the patch-token mean
  keel pretrain --resume runs/simclr-resnet18_cifar-digits-20260101-120000
  torchrun --nproc_per_node=4 -m keel pretrain data.source=/data/images   # several GPUs/processes

configuration: defaults < the YAML file given with -c < key=value overrides. The resolved config
is saved as config.yaml in the run directory. Keys and defaults:
{keys}"""

DEMO_EPILOG = """\
what it does: pretrains a small ResNet with SimCLR on scikit-learn's digits (1,797 8x8 images,
upscaled), then evaluates kNN and linear probe for the pretrained backbone and for the same
backbone at random init, prints the table and writes a report (PNG + JSON) to the run directory.
Takes about a minute on 2 CPU cores (55 s measured on 2026-12-05).

examples:
  keel demo
  keel demo --epochs 5 --out runs/quick-demo
  keel demo train.epochs=30 --device cuda
"""


SHOW_EPILOG = """\
pictures:
  neighbors  for --n query images (the test split, or random images of an unlabeled folder), their
             --k nearest neighbours by cosine similarity of the backbone's features among a gallery
             (the train split, or all images; at most --gallery of them). A neighbour's label is
             green when it is the query's, red when not. Good features put same-class images together.
  attention  where a ViT's class token looks in the last block, per head and averaged over heads
             (as in DINO's pictures). ViT backbones only (vit_*, deit_*).
  mae        images with most patches masked, and what a MAE decoder draws from the rest. Needs the
             run directory of a MAE pretraining (method.name=mae): the decoder is in its checkpoint.
  retrieval  for each --query text, the --k images closest to it under a keel clip train run (the
             test split of labeled --data, else all its images). No --query: "a photo of a <class>"
             for --n of the data's classes, each image titled with its label when it has one.

  Writes neighbors.png / attention.png / mae.png / retrieval.png into --out (default: the
  checkpoint's run directory; the current directory for random:MODEL) and prints the path. Same
  --seed, same picture.

examples:
  keel show neighbors --checkpoint runs/my-run --data digits
  keel show neighbors --checkpoint runs/my-run/backbone.safetensors --data path/to/images --k 5 --n 4
  keel show neighbors --checkpoint random:resnet10_cifar --data digits --out /tmp/pics   # untrained baseline
  keel show attention --checkpoint runs/my-vit-run --data fashion-mnist --n 4
  keel show mae --checkpoint runs/my-mae-run               # images from the run's own data
  keel show retrieval --checkpoint runs/clip-<run> --data photos/ --query "a red dress" --query "a sandal"
"""


FINETUNE_EPILOG = """\
modes (task.mode):
  full     every layer trains (with layer-wise lr decay if train.layer_decay < 1)
  partial  the last task.partial_blocks blocks and the head train; the rest is frozen (BN statistics too)
  linear   only a linear head on frozen features (with a non-affine BN before it, as MAE's probe)

model.backbone: a keel run directory (pretraining or fine-tuning: its backbone, the head left
behind), a .safetensors file with its card.json, timm:<model>:<weights.safetensors|.pth> (timm
weights on disk, converted), or random:<model> (training from scratch, the baseline).
data.img_size: 0 (default) = the size the backbone was trained at; random:/timm: the model's own.

data.source: a built-in name, a labeled folder, or a CSV: image,labels (multi-label, "a;b") or
image,primary,secondary (two-level); its test split is data.test_source= or every 5th row.

image + text: with a keel clip train run as model.backbone and labeled image-text pairs as
data.source (class sub-folders with a .txt beside each image, or a CSV with image, text and label
columns), both towers stay frozen and classifiers train on their embeddings: image-only, text-only,
late fusion and attention fusion, reported side by side; task.fusion (concat | attention) is kept
as fusion.safetensors.

views: a random resized crop keeping 64-100% of the image area (aug.scale_min; BiT's fine-tuning
crop) and a horizontal flip with probability 0.5 (aug.hflip). This assumes photos, where a mirror
image is the same class: for images whose orientation matters (digits, text, charts, maps) turn
the flip off with aug.hflip=0.

examples:
  keel finetune model.backbone=runs/my-run data.source=digits train.epochs=30
  keel finetune model.backbone=runs/my-run data.source=fashion-mnist task.mode=linear train.epochs=20
  keel finetune model.backbone=random:resnet18_cifar data.source=path/to/labeled train.lr=2e-3
  keel finetune model.backbone=timm:vit_small_patch16_224:vit_s.safetensors data.source=path/to/labeled train.layer_decay=0.65
  keel finetune model.backbone=random:deit_tiny_patch16 data.source=path/to/labeled data.img_size=224 recipe.name=deit train.epochs=300
  keel finetune model.backbone=runs/my-run data.source=digits recipe.name=deit distill.teacher=runs/finetune-full-resnet18 distill.kind=hard
  keel finetune model.backbone=random:resnetv2_50x1_bit data.source=path/to/big recipe.name=bit-upstream train.epochs=90
  keel finetune model.backbone=runs/<that run> data.source=path/to/small recipe.name=bit recipe.scale=0.1
                                  # BiT-HyperRule decides (a tenth of its steps); the lr is picked on held-out images
  keel finetune model.backbone=runs/my-run data.source=digits recipe.lr_search=[0.0005,0.005,0.05]
  keel finetune model.backbone=runs/my-run data.source=tags.csv data.test_source=tags-test.csv task.multilabel_loss=asl
  keel finetune model.backbone=runs/clip-<run> data.source=labeled-pairs/ task.fusion=attention
  keel finetune --resume runs/finetune-full-resnet18_cifar-digits-<time>   # after a crash: same run, exactly
  torchrun --nproc_per_node=8 -m keel finetune model.backbone=runs/my-run data.source=path/to/labeled train.batch_size=1024

configuration: defaults < the YAML file given with -c < section.key=value overrides (the flat keys of
keel 0.1, e.g. epochs=5, still work this release with a deprecation message). Saved as config.yaml
in the run directory with the values used, beside metrics.jsonl, classifier(_best).safetensors,
result.json and curves.png. Keys and defaults:
{keys}"""


def _config_keys(cls=RunConfig) -> str:
    lines = []
    for section in dataclasses.fields(cls):
        sub = section.default_factory()
        if not dataclasses.is_dataclass(sub):
            lines.append(f"  {section.name}: a list of per-stage overrides, e.g. "
                         "'stages=[{train: {epochs: 2}, data: {img_size: 16}}, {train: {epochs: 8}}]'")
            continue
        items = ", ".join(f"{f.name}={getattr(sub, f.name)!r}" for f in dataclasses.fields(sub))
        lines.append(f"  {section.name}: {items}")
    return "\n".join(lines)


def _finetune_keys() -> str:
    from keel.config import FinetuneConfig
    return _config_keys(FinetuneConfig)


def _detect_keys() -> str:
    from keel.detection.config import DetectConfig
    return _config_keys(DetectConfig)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="keel", description=MAIN_HELP, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"keel {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{pretrain,finetune,eval,detect,clip,shards,embed,search,dedup,predict,export,show,demo,models}")

    pt = sub.add_parser("pretrain", help="self-supervised pretraining of a backbone",
                        description="Pretrain a backbone on images without labels.",
                        epilog=PRETRAIN_EPILOG.format(keys=_config_keys()), formatter_class=fmt)
    pt.add_argument("-c", "--config", help="YAML config file (see the keys below)")
    pt.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly from its last checkpoint")
    pt.add_argument("--out", metavar="RUN_DIR", help="run directory (default: train.out_dir/<generated name>)")
    pt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")

    add_eval_parser(sub, _config_keys(EvalJobConfig), fmt)

    ft = sub.add_parser("finetune", help="fine-tune a backbone on labeled data (full, partial, linear)",
                        description="Fine-tune a pretrained (or random) backbone on a labeled dataset.",
                        epilog=FINETUNE_EPILOG.format(keys=_finetune_keys()), formatter_class=fmt)
    ft.add_argument("-c", "--config", help="YAML config file (see the keys below)")
    ft.add_argument("--out", metavar="RUN_DIR", help="run directory (default: out_dir/<generated name>)")
    ft.add_argument("--resume", metavar="RUN_DIR",
                    help="continue a run exactly from its last checkpoint (end of its last finished epoch), "
                         "with the run's own config.yaml")
    ft.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=20 mode=partial")

    add_detect_parser(sub, _detect_keys(), fmt)
    add_clip_parser(sub, fmt)
    add_shards_parser(sub, fmt)
    add_deploy_parsers(sub, fmt)

    sh = sub.add_parser("show", help="pictures from a checkpoint: neighbours, attention maps, MAE reconstructions, "
                                     "text-to-image retrieval",
                        description="Draw what a pretrained backbone has learned, as a PNG.",
                        epilog=SHOW_EPILOG, formatter_class=fmt)
    sh.add_argument("picture", choices=["neighbors", "attention", "mae", "retrieval"])
    sh.add_argument("--checkpoint", required=True,
                    help="a run directory, a backbone.safetensors with its card.json, or random:MODEL "
                         "(mae: the run directory)")
    sh.add_argument("--data", help="built-in name or image folder (default: the data the checkpoint was pretrained on,"
                                   " else digits)")
    sh.add_argument("--out", metavar="DIR", help="folder for the PNG (default: the checkpoint's run directory)")
    sh.add_argument("--n", type=int, default=8, help="images (neighbors: queries) to show (default: 8)")
    sh.add_argument("--k", type=int, default=8, help="neighbors: neighbours per query (default: 8)")
    sh.add_argument("--gallery", type=int, default=5000,
                    help="neighbors: at most this many gallery images, drawn at random (default: 5000; 0: all)")
    sh.add_argument("--img-size", type=int, help="neighbors, attention: image side (default: the one the backbone was trained "
                                                "at; mae always uses the run's own)")
    sh.add_argument("--query", action="append", metavar="TEXT",
                    help="retrieval: a text to find images for (repeat for several; default: 'a photo of a "
                         "<class>' for the data's classes)")
    sh.add_argument("--seed", type=int, default=0, help="which images are drawn, and the MAE mask (default: 0)")
    sh.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")

    dm = sub.add_parser("demo", help="pretrain on built-in digits and compare with random init",
                        description="The whole pipeline in a few minutes on a laptop CPU.",
                        epilog=DEMO_EPILOG, formatter_class=fmt)
    dm.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the demo's own)")
    dm.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/demo-<time>)")
    dm.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    dm.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.name=vit_tiny_patch4_32")

    md = sub.add_parser("models", help="list the backbones",
                        description="List registered backbones with their size and feature maps.",
                        epilog="examples:\n  keel models vit              # only names containing 'vit'\n  keel models --with-head      # parameters as the papers count them (1000-class head)\n\nGMACs: multiply-accumulates for one image at the model's default resolution (column 'at px'),\nwhat papers call FLOPs.", formatter_class=fmt)
    md.add_argument("filter", nargs="?", default="", help="show only names containing this text")
    md.add_argument("--with-head", action="store_true",
                    help="count a 1000-class head, as papers do (default: the backbone alone)")
    return p


def _version() -> str:
    from keel import __version__
    return __version__


# ---------------------------------------------------------------- sub-commands
def cmd_pretrain(args) -> int:
    from keel.engine.distributed import rank
    from keel.jobs.pretrain import pretrain

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"'{run_dir}' is not a run directory (no config.yaml in it)")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        from keel.engine.checkpoint import has_checkpoint
        if not has_checkpoint(run_dir) and not any(has_checkpoint(s) for s in run_dir.glob("stage*")):
            raise ConfigError(f"'{run_dir}' has no checkpoint yet (checkpoints/last.pt, or last.json for a sharded "
                              "one); start it again instead")
        result = pretrain(cfg, run_dir, resume=True)
    else:
        cfg = load_config(args.config, args.overrides)
        result = pretrain(cfg, args.out)
    if rank() != 0:
        return 0
    print(f"done: {result['steps']} steps, final loss {result['loss']:.4f}"
          + (f", kNN top-1 {result['knn']:.2f}%" if result["knn"] is not None else "")
          + f"\nbackbone: {result['run_dir']}/backbone.safetensors")
    return 0


def cmd_finetune(args) -> int:
    from keel.config import FinetuneConfig
    from keel.jobs.finetune import default_run_dir, run_finetune
    if args.resume:
        if args.config or args.out or args.overrides:
            raise ConfigError("--resume continues a run with its own config.yaml and directory: "
                              "give no -c/--config, --out or key=value with it")
        run_dir = Path(args.resume)
        res = run_finetune(None, run_dir, resume=True)
    else:
        cfg = load_config(args.config, args.overrides, cls=FinetuneConfig)
        run_dir = Path(args.out) if args.out else default_run_dir(cfg)
        res = run_finetune(cfg, run_dir)
    if os.environ.get("RANK", "0") != "0":      # under torchrun rank 0 reports (and wrote run_dir)
        return 0
    if "kept" in res:                           # image + text: fusion heads (keel.jobs.fusion)
        from keel.tasks.fusion import describe_fusion
        print(f"{describe_fusion(res)}\nkept the {res['kept']} head: {run_dir}/fusion.safetensors")
        return 0
    key = res["main_metric"]
    if "lr_search" in res:
        search = res["lr_search"]
        print(f"lr search on {search['holdout']} held-out training images: "
              + ", ".join(f"{lr} -> {v:.2f}" for lr, v in search["scores"].items()) + f"; chose {search['chosen']:g}")
    print(f"done: {res['mode']} fine-tuning, {res['steps']} steps; {key} {res['final'][key]:.2f} at the end, "
          f"{res['best'][key]:.2f} at best (epoch {res['best']['epoch']}, chosen on the test split)\n"
          f"classifier: {run_dir}/classifier.safetensors")
    return 0


def cmd_show(args) -> int:
    from keel import show
    from keel.engine.distributed import resolve_device

    for flag in ("n", "k"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.gallery < 0:
        raise ValueError(f"--gallery must be 0 (all) or more, got {args.gallery}")
    device = resolve_device(args.device)
    spec = args.checkpoint
    if args.picture == "mae":
        run_dir = show.mae_run_dir(spec)
        out = _writable(Path(args.out) if args.out else run_dir)
        path = show.show_mae(run_dir, args.data, out, n=args.n, seed=args.seed, device=device)
        print(f"wrote {path}")
        return 0

    if args.picture == "retrieval":
        from keel.jobs.clip import is_clip_run
        if not is_clip_run(spec):
            raise ValueError(f"keel show retrieval needs a keel clip train run as --checkpoint; '{spec}' has no clip.json")
        out = _writable(Path(args.out) if args.out else Path(spec))
        from keel.tasks.clip_config import ClipConfig
        data = args.data or load_config(Path(spec) / "config.yaml", cls=ClipConfig).data.source
        path = show.show_retrieval(spec, data, out, args.query, n=args.n, k=args.k, gallery=args.gallery,
                                   seed=args.seed, device=device)
        print(f"wrote {path}")
        return 0

    from keel.engine.checkpoint import read_card

    from keel import hub
    backbone, size = hub.resolve_backbone(spec, args.img_size, arg="--checkpoint")
    if spec.startswith(("random:", "timm:")):
        card, default_out, name = {}, Path("."), spec
    else:
        try:
            _, card = read_card(spec)
        except (FileNotFoundError, ValueError):     # a fine-tune run: no card, its data in config.yaml
            card = {}
        default_out = Path(spec) if Path(spec).is_dir() else Path(spec).parent
        name = default_out.resolve().name
    data = args.data or card.get("data", {}).get("source") or "digits"
    out = _writable(Path(args.out) if args.out else default_out)
    if args.picture == "neighbors":
        path = show.show_neighbors(backbone, data, out, size, n=args.n, k=args.k, gallery=args.gallery,
                                   seed=args.seed, device=device, name=name)
    else:
        if not hasattr(backbone, "last_self_attention"):
            model = card.get("model") or spec.split(":", 1)[-1]
            raise ValueError(f"'{spec}' is a {model} backbone: attention maps need a ViT (vit_*, deit_*)")
        path = show.show_attention(backbone, data, out, size, n=args.n, seed=args.seed, device=device, name=name)
    print(f"wrote {path}")
    return 0


def _writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder '{folder}': {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write to '{folder}': choose another folder with --out DIR")
    return folder


def cmd_demo(args) -> int:
    from keel.demo import run_demo

    run_demo(epochs=args.epochs, run_dir=args.out, device=args.device, overrides=args.overrides)
    return 0


def cmd_models(args) -> int:
    from keel import list_models
    from keel.models.stats import cached_stats

    names = list_models(args.filter)
    if not names:
        raise ValueError(f"no model name contains '{args.filter}'; `keel models` lists them all")
    print(f"{'name':<28} {'params (M)':>10} {'GMACs':>7} {'at px':>6}  {'feature strides':<16} channels")
    for name in names:
        st = cached_stats(name, num_classes=1000 if args.with_head else 0)
        strides = ",".join(str(f["stride"]) for f in st["feature_info"])
        chans = ",".join(str(f["channels"]) for f in st["feature_info"])
        print(f"{name:<28} {st['params_m']:>10.2f} {st['gmacs']:>7.2f} {st['img_size']:>6}  {strides:<16} {chans}")
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "eval": cmd_eval, "detect": cmd_detect,
            "clip": cmd_clip, "shards": cmd_shards, "embed": cmd_embed, "search": cmd_search, "dedup": cmd_dedup,
            "predict": cmd_predict, "export": cmd_export, "show": cmd_show, "demo": cmd_demo, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    from keel.data.sources import DataError
    from keel.errors import TrainingError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (keel demo --epochs 5 train.lr=0.01)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    if not args.command:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, TrainingError, FileNotFoundError, ValueError) as e:
        if os.environ.get("KEEL_DEBUG"):
            raise
        print(f"keel {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `keel models | head`: the reader has gone; stop quietly (and let Python's exit flush nowhere)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: the last checkpoint is kept; continue with --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
