"""``keel detect train | eval | predict``: detection transfer (ViTDet-style), a thin layer over
:mod:`keel.jobs.detect`, :mod:`keel.detection.report` and :mod:`keel.detection.predict`."""
from __future__ import annotations

import os
from pathlib import Path

from keel.config import ConfigError, load_config

DETECT_EPILOG = """\
what it does: fine-tunes a backbone inside one of torchvision's detectors (Faster R-CNN, Mask R-CNN,
RetinaNet) on boxes you have labeled. A plain ViT gets ViTDet's adaptations: window attention in
all but 4 evenly spaced global blocks and a simple feature pyramid from its last map; hierarchical
backbones (keel hybrid, Swin, CSWin, ResNet-v2, ResNet) get an FPN over their stages. Training uses
large-scale jitter (scale 0.1-2.0, crop/pad to a square), AdamW with layer-wise lr decay 0.7 and a
step schedule, on the same trainer as every keel job (resume, several processes, bf16 on GPU).

annotations (data.source, data.test_source): COCO JSON (boxes, polygons, RLE), a folder of Pascal
VOC XML files, or a CSV image_path,xmin,ymin,xmax,ymax,label (deepforest's layout; paths relative
to the CSV). Without data.test_source every 5th image is held out whole (data.test_fraction).
Large images (aerial scenes): data.tile=400 cuts them into overlapping tiles (data.tile_overlap;
make it at least the largest object); predict merges the tiles' boxes across borders.
A bad row (box outside the image, zero area, unknown image) stops with the file and row named;
data.on_bad=skip skips and counts them instead.

train writes into the run directory: detector.safetensors, detector_best.safetensors, result.json,
report/ (ap.md: COCO AP, AP50, AP75, APs/m/l and per-class AP; errors.png: TIDE's error breakdown;
pr.png: precision-recall curves), curves.png, metrics.jsonl, config.yaml.

examples:
  keel detect train data.source=trees.csv model.backbone=runs/my-mae-run
  keel detect train data.source=coco/train.json data.test_source=coco/val.json model.backbone=runs/my-run \\
      model.detector=mask_rcnn aug.img_size=1024 train.batch_size=64 train.epochs=100
  keel detect train data.source=scene.xml data.tile=400 model.backbone=random:vit_small_patch16   # from scratch
  keel detect train --resume runs/detect-faster_rcnn-my-run-trees-<time>
  keel detect eval --checkpoint runs/detect-<run> --data other-site.csv --out runs/other-site
  keel detect predict --checkpoint runs/detect-<run> --data big_scene.tif --tile 400 --out preds/
  torchrun --nproc_per_node=8 -m keel detect train data.source=coco/train.json model.backbone=runs/my-run

configuration (train): defaults < the YAML file given with -c < section.key=value. Keys and defaults:
{keys}"""


def add_parser(sub, keys: str, fmt) -> None:
    p = sub.add_parser("detect", help="object detection on your boxes: train, eval, predict",
                       description="Transfer a backbone to object detection (ViTDet-style).",
                       epilog=DETECT_EPILOG.format(keys=keys), formatter_class=fmt)
    p.add_argument("action", choices=["train", "eval", "predict"])
    p.add_argument("-c", "--config", help="train: YAML config file (see the keys below)")
    p.add_argument("--resume", metavar="RUN_DIR", help="train: continue a run exactly from its last checkpoint")
    p.add_argument("--checkpoint", metavar="RUN_DIR", help="eval, predict: a keel detect run directory")
    p.add_argument("--best", action="store_true", help="eval, predict: the best epoch's weights, not the last")
    p.add_argument("--data", help="eval: annotations (default: the run's held-out test images); "
                                  "predict: an image or a folder of images")
    p.add_argument("--out", metavar="DIR", help="train: run directory; eval, predict: output folder")
    p.add_argument("--tile", type=int, help="predict: cut images larger than this into tiles (0: whole; "
                                            "default: the run's data.tile)")
    p.add_argument("--overlap", type=int, help="predict: pixels neighbouring tiles share (default: the run's "
                                               "data.tile_overlap)")
    p.add_argument("--device", default="auto", help="eval, predict: auto | cpu | cuda (default: auto)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="train: config overrides, e.g. train.epochs=20")


def cmd_detect(args) -> int:
    if args.action == "train":
        return _train(args)
    if not args.checkpoint:
        raise ConfigError(f"keel detect {args.action} needs --checkpoint RUN_DIR (a keel detect train run)")
    if args.overrides or args.config or args.resume:
        raise ConfigError(f"keel detect {args.action} takes no -c, --resume or key=value (they are for train)")
    from keel.engine.distributed import resolve_device
    from keel.jobs.detect import load_detector
    device = resolve_device(args.device)
    task, cfg = load_detector(args.checkpoint, best=args.best, device=str(device))
    task.to(device)
    if args.action == "eval":
        return _eval(args, task, cfg)
    if not args.data:
        raise ConfigError("keel detect predict needs --data IMAGE_OR_FOLDER")
    from keel.detection.predict import predict
    out = Path(args.out) if args.out else Path(args.checkpoint) / "predictions"
    tile = cfg.data.tile if args.tile is None else args.tile
    overlap = cfg.data.tile_overlap if args.overlap is None else args.overlap
    res = predict(task, args.data, out, tile=tile, overlap=overlap, draw_thresh=cfg.eval.draw_thresh)
    print(f"{res['images']} images, {res['detections']} detections"
          + (f", {res['skipped']} files skipped (listed in {out / 'skipped.txt'})" if res["skipped"] else "")
          + f"\nwrote {out / 'predictions.json'} and one PNG per image (boxes scored >= {cfg.eval.draw_thresh:g})")
    return 0


def _train(args) -> int:
    from keel.detection.config import DetectConfig
    from keel.jobs.detect import detect_train
    if args.resume:
        if args.config or args.out or args.overrides:
            raise ConfigError("--resume continues a run with its own config.yaml: give no -c, --out or key=value")
        run_dir = Path(args.resume)
        from keel.engine.checkpoint import has_checkpoint
        if not has_checkpoint(run_dir):
            raise ConfigError(f"'{run_dir}' has no checkpoint (checkpoints/last.pt): start it again instead")
        res = detect_train(None, run_dir, resume=True)
    else:
        cfg = load_config(args.config, args.overrides, cls=DetectConfig)
        res = detect_train(cfg, args.out)
    if os.environ.get("RANK", "0") != "0":
        return 0
    final = res.get("final")
    if final:
        print(f"done: {res['steps']} steps; test box AP {final['AP']:.1f}, AP50 {final['AP50']:.1f}, AP75 "
              f"{final['AP75']:.1f} on {final['images']} images\nreport: {res['run_dir']}/report/ap.md")
    else:
        print(f"done: {res['steps']} steps (no test images)")
    return 0


def _eval(args, task, cfg) -> int:
    from keel.detection.annotations import read_annotations
    from keel.detection.loader import DetectionData
    from keel.detection.report import write_report
    from keel.jobs.detect import split, held_out_records
    run = Path(args.checkpoint)
    if args.data:
        ann = read_annotations(args.data, on_bad=cfg.data.on_bad, classes=task.classes[1:])
        records = held_out_records(cfg, ann.records)
    else:   # the run's own held-out images (tiles), split again from its config exactly as in training
        records = split(cfg)[1]
    out = Path(args.out) if args.out else run / "report"
    m = write_report(task, DetectionData(records, task.classes, cfg.model.detector == "mask_rcnn"), out,
                     masks=cfg.model.detector == "mask_rcnn")
    print(f"box AP {m['AP']:.1f}, AP50 {m['AP50']:.1f}, AP75 {m['AP75']:.1f} on {m['images']} images "
          f"({m['detections']} detections)\nwrote {out}/ap.md, errors.png, pr.png")
    return 0
