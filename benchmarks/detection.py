"""Detection training speed: keel's ViTDet-style Mask R-CNN (ViT-B/16) against torchvision's
``maskrcnn_resnet50_fpn_v2``, one training step each, in one run.

One training step = the detector's forward in training mode (RPN, RoI sampling, box and mask
losses), backward and one AdamW step, on a fixed synthetic batch: ``--batch`` random images of
``--size`` x ``--size`` with ``--objects`` random boxes each, every box with a filled rectangle as
its mask. Both models get the same batch, the same number of classes, the same optimizer and the
same input size (both built with ``min_size = max_size = --size``, so a square image is not
resized; ``--size`` must be a multiple of 64 so neither pads). Steps of the two models alternate
(ABAB...) after ``--warmup`` steps each, so machine noise hits both alike; the median step time
is kept. Weights are random (no downloads): speed does not depend on them.

keel's side: ``keel.jobs.detect.build_task`` with ``model.backbone=random:vit_base_patch16``,
``model.detector=mask_rcnn``, ``model.vitdet_heads=true``, ``model.out_channels=256``,
``model.roi_batch=512`` (torchvision's RoI sampling). What differs between the two models is
printed and written with the result (:data:`DIFFERENCES` plus the ViT's window and global
blocks): the backbone and its pyramid, and the norm in the heads; anchors and RoI sampling agree.

On the CPU (fp32) only the ratio keel / torchvision means anything. With ``--device cuda`` the
steps run under bf16 autocast, timed between ``torch.cuda.synchronize()`` calls, and each model's
peak memory is reported: ``torch.cuda.max_memory_allocated`` during its steps, less what the other
model holds (its weights, gradients and AdamW state). ViTDet (Li et al. 2022, table 16 of the
arXiv version) reports 10.9 GB per GPU for ViT-B Mask R-CNN at 1024 px, batch 1 per GPU.

    python benchmarks/detection.py --size 256 --steps 5                              # CPU: the ratio
    python benchmarks/detection.py --device cuda --size 1024 --batch 1 --steps 20    # GPU: img/s, memory

The result is merged into ``benchmarks/results/detection_speed.json`` under the device's name.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

from keel.config import load_config
from keel.detection.config import DetectConfig
from keel.jobs.detect import build_task

KEEL_OVERRIDES = ["model.backbone=random:vit_base_patch16", "model.detector=mask_rcnn", "model.vitdet_heads=true",
                  "model.out_channels=256", "model.roi_batch=512"]
DIFFERENCES = {
    "backbone": "keel: ViT-B/16 (absolute positions only; ViTDet adds relative positions), ViTDet's simple "
                "pyramid p2-p6 from the stride-16 map, LayerNorm | torchvision: ResNet-50 (every stage trains, "
                "BatchNorm in training mode as torchvision builds it without pretrained weights) + FPN p2-p6 "
                "with BatchNorm",
    "heads": "both torchvision's MaskRCNN: 2-conv RPN, 4conv1fc box head (fc 1024), 4-conv mask head | "
             "keel normalises the head convs with LayerNorm (ViTDet), torchvision with BatchNorm",
    "anchors": "same: one size per level, 32/64/128/256/512 px at strides 4-64, ratios 0.5/1/2",
    "sampling": "same: RPN 2000 proposals before and after NMS, 512 RoIs per image (25% positive)",
    "input": "same size and batch; keel normalises with mean/std 0.5, torchvision with ImageNet's; keel pads "
             "to a multiple of 64, torchvision of 32 (no padding at a --size multiple of 64)",
}


def synthetic_batch(n: int, size: int, objects: int, classes: int, seed: int) -> tuple[list, list]:
    """``n`` random images in [0, 1] and their targets: ``objects`` boxes of 1/16 to 1/2 of the
    side, random labels 1..classes, each mask the box's rectangle."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=g))
        wh = torch.randint(size // 16, size // 2 + 1, (objects, 2), generator=g)
        xy = (torch.rand(objects, 2, generator=g) * (size - wh)).floor()
        boxes = torch.cat([xy, xy + wh], dim=1).float()
        masks = torch.zeros(objects, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            m[y0:y1, x0:x1] = 1
        labels = torch.randint(1, classes + 1, (objects,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def keel_model(size: int, classes: int, seed: int) -> tuple[nn.Module, Callable]:
    """keel's detection task and a function (images, targets) -> loss through it."""
    cfg = load_config(overrides=KEEL_OVERRIDES + [f"train.seed={seed}"], cls=DetectConfig)
    names = ["__background__"] + [f"c{i}" for i in range(1, classes + 1)]
    task = build_task(cfg, names, size)
    task.train_mode()
    return task, lambda images, targets: task({"images": images, "targets": targets})["loss"]


def torchvision_model(size: int, classes: int, seed: int) -> tuple[nn.Module, Callable]:
    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=classes + 1,
                                     min_size=size, max_size=size).train()
    return model, lambda images, targets: sum(model(images, targets).values())


def input_shape(model: nn.Module, images: list, targets: list) -> tuple[int, ...]:
    """The padded batch the detector's transform hands its backbone (keel's task holds its
    torchvision detector as ``detector``)."""
    with torch.no_grad():
        return tuple(getattr(model, "detector", model).transform(images, [dict(t) for t in targets])[0].tensors.shape)


def held_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the model's parameters, gradients and optimizer state."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


class Stepper:
    """One model's training step, its times and (on a GPU) its own peak memory."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batch: tuple[list, list], device: torch.device):
        self.model, self.loss_fn, self.batch, self.device = model, loss_fn, batch, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                     fused=device.type == "cuda" or None)
        self.times: list[float] = []
        self.peak = 0

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.loss_fn(*self.batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def timed(self, others: list[Stepper], record: bool = True) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            # what the other models hold stays allocated during this step: not this model's memory
            foreign = sum(held_bytes(o.model, o.opt) for o in others)
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        self.step()
        if cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - foreign)
        if record:
            self.times.append(time.perf_counter() - t)


def run(steppers: dict[str, Stepper], warmup: int, steps: int) -> None:
    """Warm-up steps, then timed steps taking turns (ABAB...), so both see the same machine state."""
    order = list(steppers.values())
    for _ in range(warmup):
        for s in order:
            s.timed([o for o in order if o is not s], record=False)
    for _ in range(steps):
        for s in order:
            s.timed([o for o in order if o is not s])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return f"CPU {model}"


def merge_json(path: Path, key: str, result: dict) -> None:
    """Write ``result`` under ``key`` in the results file, keeping the other devices' results."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("benchmark", "Detection training speed: keel ViTDet Mask R-CNN (ViT-B) vs torchvision "
                                 "maskrcnn_resnet50_fpn_v2")
    data.setdefault("script", "benchmarks/detection.py")
    data.setdefault("results", {})[key] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=1024, help="image side, a multiple of 64 (ViTDet: 1024)")
    ap.add_argument("--batch", type=int, default=1, help="images per step (ViTDet: 1 per GPU)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (median kept)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--objects", type=int, default=4, help="boxes (and masks) per image")
    ap.add_argument("--classes", type=int, default=80, help="object classes (COCO: 80)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "detection_speed.json"))
    args = ap.parse_args()
    if args.size < 64 or args.size % 64:
        ap.error(f"--size must be a positive multiple of 64 (keel pads to 64, torchvision to 32), got {args.size}")
    if min(args.batch, args.steps, args.objects, args.classes, args.threads) < 1 or args.warmup < 0:
        ap.error("--batch, --steps, --objects, --classes and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    images, targets = synthetic_batch(args.batch, args.size, args.objects, args.classes, args.seed)
    built = {"keel": keel_model(args.size, args.classes, args.seed),
             "torchvision": torchvision_model(args.size, args.classes, args.seed)}
    shapes = {k: input_shape(m, images, targets) for k, (m, _) in built.items()}
    if len(set(shapes.values())) != 1:
        raise SystemExit(f"the two detectors see different inputs: {shapes}")
    params = {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in built.items()}
    vit = built["keel"][0].backbone.cfg
    differences = dict(DIFFERENCES, keel_vit=f"window {vit.window_size}, global blocks {list(vit.global_blocks)}, "
                                             f"drop-path {vit.drop_path_rate}, rel_pos {vit.rel_pos}")

    batch = ([im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
    steppers = {k: Stepper(m.to(device), fn, batch, device) for k, (m, fn) in built.items()}
    run(steppers, args.warmup, args.steps)

    where = device_name(device)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"Mask R-CNN training step: {where} ({args.threads} threads), {precision}, batch {args.batch} at "
          f"{args.size} px (input {shapes['keel']}), {args.objects} objects/image, {args.classes} classes, "
          f"median of {args.steps} after {args.warmup} warm-up, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}")
    for k, v in differences.items():
        print(f"  {k}: {v}")
    print("| model | params (M) | median step (s) | img/s | peak memory (GB) |")
    print("|---|---|---|---|---|")
    rows = {}
    for k, s in steppers.items():
        t = statistics.median(s.times)
        mem = s.peak / 1e9 if device.type == "cuda" else None
        rows[k] = {"params_m": round(params[k] / 1e6, 2), "median_step_s": t, "img_s": args.batch / t,
                   "step_times_s": s.times, "peak_memory_gb": mem}
        print(f"| {k} | {params[k] / 1e6:.1f} | {t:.3f} | {args.batch / t:.2f} | "
              f"{f'{mem:.2f}' if mem is not None else '—'} |")
    ratio = rows["keel"]["img_s"] / rows["torchvision"]["img_s"]
    print(f"keel / torchvision img/s: {ratio:.3f}")

    result = {"date": time.strftime("%Y-%m-%d"), "device": where, "threads": args.threads, "precision": precision,
              "torch": torch.__version__, "torchvision": torchvision.__version__, "args": vars(args),
              "input_shape": list(shapes["keel"]), "keel_overrides": KEEL_OVERRIDES, "differences": differences,
              "rows": rows, "img_s_ratio_keel_over_torchvision": ratio,
              "vitdet_reference": "ViTDet: 10.9 GB per GPU, ViT-B Mask R-CNN, 1024 px, batch 1 per GPU"}
    merge_json(Path(args.json), where, result)
    print(f"written to {args.json} under {where!r}")


if __name__ == "__main__":
    main()
