"""``keel clip train | zeroshot | retrieval | fusion``: image-text pretraining (CLIP, SigLIP, LiT)
and what it gives, a thin layer over :mod:`keel.jobs.clip`, :mod:`keel.evaluate.zeroshot` and
:mod:`keel.tasks.fusion`."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from keel.config import ConfigError, load_config

CLIP_EPILOG = """\
what it does: trains an image tower (any keel backbone, from scratch or from a keel run) and a
Transformer text tower so that an image and its caption land close together (CLIP's softmax loss,
or SigLIP's pairwise sigmoid: model.loss=siglip). model.lock_image=true keeps a pretrained image
tower as it is and teaches the text tower to match it (LiT). The tokenizer is trained on your own
captions (BPE, saved as tokenizer.json); nothing is downloaded.

data.source: a folder with a .txt beside each image (same name), a .csv with an image path column
and a text column, or shards:PATH (keel shards output with captions). Images without a caption or
with an empty one are skipped and counted; undecodable images are skipped and listed.

train writes: backbone.safetensors + card.json (the image tower, for every keel evaluation:
keel eval knn model.backbone=RUN), clip.safetensors + clip.json + tokenizer.json (both towers),
result.json, metrics.jsonl, curves.png, config.yaml.

examples:
  keel clip train data.source=products.csv model.image=random:vit_small_patch16 data.img_size=96
  keel clip train data.source=photos/ model.image=runs/my-dino-run model.lock_image=true   # LiT
  keel clip train data.source=shards:/data/captioned model.image=runs/my-run model.loss=siglip
  keel clip train --resume runs/clip-<run>          # after a crash: the same run, exactly
  keel clip zeroshot --checkpoint runs/clip-<run> --data fashion-mnist [--templates prompts.txt]
                                     # = keel eval zeroshot model.backbone=RUN data.source=fashion-mnist
  keel clip retrieval --checkpoint runs/clip-<run> --data held-out-pairs.csv
  keel clip fusion --checkpoint runs/clip-<run> --data labeled-pairs/      # class sub-folders + .txt
                                     # = keel finetune model.backbone=RUN data.source=labeled-pairs/ (keeps a head)
  keel show retrieval --checkpoint runs/clip-<run> --data photos/ --query "a red dress"
  torchrun --nproc_per_node=8 -m keel clip train data.source=shards:/data/captioned model.image=random:vit_base_patch16

configuration (train): defaults < the YAML file given with -c < section.key=value. Keys and defaults:
{keys}"""


def _keys() -> str:
    from dataclasses import fields
    from keel.tasks.clip_config import ClipConfig
    cfg = ClipConfig()
    return "\n".join(f"  {s.name}.{f.name} = {getattr(getattr(cfg, s.name), f.name)!r}"
                     for s in fields(cfg) for f in fields(getattr(cfg, s.name)))


def add_parser(sub, fmt=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser("clip", help="image-text pretraining (CLIP, SigLIP, LiT), zero-shot, retrieval, fusion",
                       description="Image-text contrastive pretraining and its evaluations.",
                       epilog=CLIP_EPILOG.format(keys=_keys()), formatter_class=fmt)
    p.add_argument("action", choices=["train", "zeroshot", "retrieval", "fusion"])
    p.add_argument("-c", "--config", help="train: YAML config file (see the keys below)")
    p.add_argument("--resume", metavar="RUN_DIR", help="train: continue a run exactly from its last checkpoint")
    p.add_argument("--out", metavar="DIR", help="train: run directory; others: where result JSON goes")
    p.add_argument("--checkpoint", metavar="RUN_DIR", help="zeroshot, retrieval, fusion: a keel clip train run")
    p.add_argument("--data", help="zeroshot: a labeled image set (built-in name or class folders); retrieval: "
                                  "image-text pairs; fusion: labeled pairs (class sub-folders or a CSV label column)")
    p.add_argument("--templates", metavar="FILE", help="zeroshot: prompt templates, one a line with {} for the class")
    p.add_argument("--classes", metavar="FILE", help="zeroshot: class names, one a line (default: the data's)")
    p.add_argument("--split", default="test", help="zeroshot: train | test (default: test)")
    p.add_argument("--epochs", type=int, default=100, help="fusion: epochs of each head (default: 100)")
    p.add_argument("--device", default="auto", help="zeroshot, retrieval, fusion: auto | cpu | cuda")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train: config overrides, e.g. train.epochs=20")
    p.set_defaults(func=cmd_clip)
    return p


def cmd_clip(args) -> int:
    if args.action == "train":
        return _train(args)
    if not args.checkpoint or not args.data:
        raise ConfigError(f"keel clip {args.action} needs --checkpoint RUN_DIR (a keel clip train run) and --data")
    if args.overrides or args.config or args.resume:
        raise ConfigError(f"keel clip {args.action} takes no -c, --resume or key=value (they are for train)")
    from keel.engine.distributed import resolve_device
    device = resolve_device(args.device)
    if args.action == "fusion":
        from keel.jobs.fusion import fusion_from_run
        from keel.tasks.fusion import describe_fusion
        res = fusion_from_run(args.checkpoint, args.data, epochs=args.epochs, device=str(device))
        print(describe_fusion(res))
        return _write(args, "fusion", res)
    from keel.evaluate import zeroshot as Z
    if args.action == "zeroshot":
        res = Z.zeroshot_from_run(args.checkpoint, args.data, args.templates, args.classes, args.split, device)
        print(Z.describe_zeroshot(res))
        return _write(args, "zeroshot", res)
    res = Z.retrieval_from_run(args.checkpoint, args.data, device)
    print(Z.describe_retrieval(res))
    return _write(args, "retrieval", res)


def _write(args, what: str, res: dict) -> int:
    out = Path(args.out) if args.out else Path(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{what}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / f'{what}.json'}")
    return 0


def _train(args) -> int:
    from keel.jobs.clip import clip_train
    from keel.tasks.clip_config import ClipConfig
    if args.resume:
        if args.config or args.out or args.overrides:
            raise ConfigError("--resume continues a run with its own config.yaml: give no -c, --out or key=value")
        from keel.engine.checkpoint import has_checkpoint
        if not has_checkpoint(args.resume):
            raise ConfigError(f"'{args.resume}' has no checkpoint (checkpoints/last.pt): start it again instead")
        res = clip_train(None, args.resume, resume=True)
    else:
        res = clip_train(load_config(args.config, args.overrides, cls=ClipConfig), args.out)
    if os.environ.get("RANK", "0") == "0":
        print(f"done: {res['steps']} steps, final loss {res['loss']:.4f}; image tower: {res['run_dir']}/backbone.safetensors")
    return 0
