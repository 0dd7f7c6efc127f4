"""Detection transfer, from a config to a finished run: annotations, backbone, pyramid and detector
meet here, and the one trainer runs them (:class:`keel.tasks.detect.DetectionTask`).

* ``detect_train(cfg, run_dir)``: read and check the annotations (:mod:`keel.detection.annotations`),
  hold out whole test images, cut large images into tiles, build the detector, train, evaluate on
  the test images every ``train.eval_every`` epochs (COCO box AP, the best kept as
  ``detector_best.safetensors``) and write the final report (:mod:`keel.detection.report`).
* ``load_detector(run_dir)``: the trained task again, from config.yaml and ``detector.safetensors``
  (safetensors: loading never runs code).

Artifacts: config.yaml (values used), metrics.jsonl, checkpoints/last.pt, detector.safetensors,
detector_best.safetensors, classes.json, test.json (the held-out ground truth, COCO), result.json,
report/ (AP table, error breakdown, PR curves), curves.png.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from keel import hub
from keel.config import ConfigError, load_config, to_dict
from keel.detection.annotations import read_annotations
from keel.detection.dataset import write_coco
from keel.detection.config import DetectConfig
from keel.detection.detectors import KINDS, build_detector
from keel.detection.loader import DetectionData
from keel.detection.pyramid import build_pyramid
from keel.detection.tiles import tile_records
from keel.engine import distributed as D
from keel.engine.checkpoint import save_weights, write_json
from keel.engine.hooks import EvalHook
from keel.engine.trainer import Trainer
from keel.models.vit import VisionTransformer
from keel.tasks.detect import DetectionTask

MEAN = STD = (0.5, 0.5, 0.5)     # keel's normalisation for every backbone (keel.data.views)


def check(cfg: DetectConfig) -> None:
    """One-line errors for values no run could use, before anything is read or built."""
    d, m, a = cfg.data, cfg.model, cfg.aug
    if not d.source:
        raise ConfigError("data.source: give the annotations (COCO .json, a folder of VOC .xml, or a .csv "
                          "image_path,xmin,ymin,xmax,ymax,label)")
    if not m.backbone:
        raise ConfigError("model.backbone: give a keel run directory, a .safetensors file, timm:<model>:<file> "
                          "or random:<model>")
    if m.detector not in KINDS:
        raise ConfigError(f"model.detector must be one of {' | '.join(KINDS)}, got {m.detector!r}")
    if d.on_bad not in ("error", "skip"):
        raise ConfigError(f"data.on_bad must be error or skip, got {d.on_bad!r}")
    if not 0.0 < d.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction is a fraction in (0, 1), got {d.test_fraction}")
    if d.tile < 0 or (d.tile and not 0 <= d.tile_overlap < d.tile):
        raise ConfigError(f"data.tile must be >= 0 and data.tile_overlap in [0, data.tile), got {d.tile}, {d.tile_overlap}")
    if not 0.0 < a.scale_min <= a.scale_max:
        raise ConfigError(f"aug.scale_min and aug.scale_max must satisfy 0 < min <= max, got {a.scale_min}, {a.scale_max}")
    if not 0.0 <= a.hflip <= 1.0:
        raise ConfigError(f"aug.hflip must be in [0, 1], got {a.hflip}")
    if a.img_size < 0 or cfg.train.epochs < 1 or cfg.train.batch_size < 1:
        raise ConfigError("aug.img_size must be >= 0, train.epochs and train.batch_size >= 1")


def split(cfg: DetectConfig):
    """``(train records, test records, classes, skipped)``: whole images held out, never tiles of
    one image on both sides; ``data.tile`` then cuts each side's large images into tiles."""
    d = cfg.data
    images = d.images or None
    ann = read_annotations(d.source, images, on_bad=d.on_bad)
    skipped = dict(ann.skipped)
    if d.test_source:
        test_ann = read_annotations(d.test_source, images, on_bad=d.on_bad, classes=ann.classes[1:])
        train, test = list(ann.records), list(test_ann.records)
        for k, v in test_ann.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    else:
        every = max(2, round(1 / d.test_fraction))
        if len(ann.records) < 2:
            raise ConfigError(f"data.source {d.source} has {len(ann.records)} image(s): a test image cannot be held "
                              "out; give data.test_source, or data.tile to hold out tiles")
        train = [r for i, r in enumerate(ann.records) if i % every != every - 1]
        test = [r for i, r in enumerate(ann.records) if i % every == every - 1]
    if d.tile:
        train = tile_records(train, d.tile, d.tile_overlap, keep_empty=False)
    return train, held_out_records(cfg, test), ann.classes, skipped


def held_out_records(cfg: DetectConfig, records) -> list:
    """Test images as they are evaluated: cut into tiles when the run tiles (empty tiles kept:
    a detection there is a false positive), numbered 1..n for COCO."""
    if cfg.data.tile:
        records = tile_records(records, cfg.data.tile, cfg.data.tile_overlap)
    records = list(records)
    for i, r in enumerate(records):
        r.image_id = i + 1
    return records


def resolve_img_size(cfg: DetectConfig, records) -> int:
    """``aug.img_size``, or the training images' median longer side rounded to 32, within 64..1024."""
    if cfg.aug.img_size:
        return cfg.aug.img_size
    side = statistics.median(max(r.width, r.height) for r in records)
    return int(min(1024, max(64, 32 * round(side / 32))))


def default_window(vit: VisionTransformer, img_size: int) -> int:
    """ViTDet's window 14 on the 64 x 64 grid of 1024 px at patch 16, scaled to this grid."""
    return max(2, round(img_size / vit.cfg.patch_size * 14 / 64))


def build_task(cfg: DetectConfig, classes: list[str], img_size: int) -> DetectionTask:
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    backbone, _ = hub.resolve_backbone(m.backbone, None, seed=cfg.train.seed)
    if isinstance(backbone, VisionTransformer):
        window = m.window_size or default_window(backbone, img_size)
        pyramid = build_pyramid(backbone, m.out_channels, window_size=window, drop_path_rate=m.drop_path_rate,
                                rel_pos_decomposed=m.rel_pos_decomposed)
    else:
        pyramid = build_pyramid(backbone, m.out_channels)
    detector = build_detector(m.detector, pyramid, len(classes) - 1, img_size, MEAN, STD, m.vitdet_heads,
                              m.anchor_scale, cfg.eval.detections_per_img, cfg.eval.score_thresh, m.roi_batch)
    return DetectionTask(pyramid.backbone, detector, img_size, classes, (cfg.aug.scale_min, cfg.aug.scale_max),
                         cfg.aug.hflip, m.freeze_backbone, m.freeze_bn)


def save_detector(task: DetectionTask, path: Path) -> None:
    # the detector holds the backbone too (task.backbone is the same module): saved once, from it
    save_weights(task.detector, path, {"classes": json.dumps(task.classes), "img_size": task.img_size})


def load_detector(run_dir: str | Path, best: bool = False, device: str = "cpu") -> tuple[DetectionTask, DetectConfig]:
    """The trained task of a ``keel detect train`` run (weights through safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    run_dir = Path(run_dir)
    path = run_dir / ("detector_best.safetensors" if best else "detector.safetensors")
    if not (run_dir / "config.yaml").is_file() or not path.is_file():
        raise FileNotFoundError(f"--checkpoint {run_dir}: not a keel detect run (needs config.yaml and {path.name})")
    cfg = load_config(run_dir / "config.yaml", cls=DetectConfig)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    task = build_task(cfg, json.loads(meta["classes"]), int(meta["img_size"]))
    task.detector.load_state_dict(load_file(str(path), device=device))
    return task.eval(), cfg


def _header(cfg, train, test, classes, skipped, img_size, trainer) -> str:
    boxes = sum(len(r.boxes) for r in train)
    bad = f", {sum(skipped.values())} bad rows skipped ({', '.join(f'{k} {v}' for k, v in skipped.items())})" if skipped else ""
    t = cfg.train
    return (f"detect · {cfg.model.detector} on {cfg.model.backbone} · {cfg.data.source}: {len(train)} training "
            f"{'tiles' if cfg.data.tile else 'images'} ({boxes} boxes), {len(test)} test, {len(classes) - 1} "
            f"class{'es' if len(classes) > 2 else ''}{bad} · {img_size} px · lr {t.lr:g} per 256 · batch "
            f"{t.batch_size} · {t.epochs} epochs · {trainer.device} × {trainer.dist.world_size} → {trainer.run_dir}")


def default_run_dir(cfg: DetectConfig) -> Path:
    spec = cfg.model.backbone.rstrip("/")
    what = spec.split(":")[1] if spec.startswith(("timm:", "random:")) else Path(spec).name
    return Path(cfg.train.out_dir) / "-".join(["detect", cfg.model.detector, what or "backbone",
                                               Path(cfg.data.source).stem or "data", time.strftime("%Y%m%d-%H%M%S")])


def detect_train(cfg: DetectConfig | None, run_dir: str | Path | None = None, resume: bool = False,
                 quiet: bool = False) -> dict:
    """Train (or with ``resume`` continue) a detector; returns result.json's content."""
    from keel.detection.report import write_report
    if resume:
        cfg = load_config(Path(run_dir) / "config.yaml", cls=DetectConfig)
    check(cfg)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    masks = cfg.model.detector == "mask_rcnn"
    train_recs, test_recs, classes, skipped = split(cfg)
    if not train_recs or not any(len(r.boxes) for r in train_recs):
        raise ConfigError(f"data.source {cfg.data.source}: no training image has a box")
    img_size = resolve_img_size(cfg, train_recs)
    cfg.aug.img_size = img_size     # config.yaml records the size used
    train, test = DetectionData(train_recs, classes, masks), DetectionData(test_recs, classes, masks)
    task = build_task(cfg, classes, img_size)
    trainer = Trainer(cfg, run_dir, resume=resume, quiet=quiet)
    if trainer.is_main and not quiet:
        print(_header(cfg, train_recs, test_recs, classes, skipped, img_size, trainer))
    if trainer.writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "classes.json").write_text(json.dumps(classes[1:]) + "\n")
        write_coco(run_dir / "test.json", test_recs, classes)

    def on_best(epoch, metrics):
        if trainer.writes:
            save_detector(task, run_dir / "detector_best.safetensors")
    hook = EvalHook(test, cfg.train.eval_every, on_best=on_best)
    result = trainer.fit(task, train, [hook] if len(test) else [])
    out = {"run_dir": str(run_dir), "steps": result["steps"], "finished": result["finished"], "loss": result["loss"],
           "img_size": img_size, "classes": classes[1:], "train_images": len(train), "test_images": len(test),
           "skipped_rows": skipped, "skipped_images": result["skipped"], "best": hook.best, "config": to_dict(cfg)}
    if trainer.writes:
        save_detector(task, run_dir / "detector.safetensors")
        if len(test):
            out["final"] = write_report(task, test, run_dir / "report", masks=masks)
        write_json(run_dir / "result.json", out)
    D.barrier()
    return out

