"""Every keel self-supervised method on Fashion-MNIST, and lightly's SimCLR, BYOL, SwAV and DINO
beside keel's, with the same backbone, budget and augmentations.

Each run pretrains on the train split (or a subset), then the frozen backbone is evaluated on
the 10k test images: kNN (cosine, t = 0.1, k = 200 and k = 20) and a linear probe. Also reported:
training wall time, time per epoch, and peak memory. Baselines: the same backbones at random
init (the very weights every run starts from) and raw pixels.

Each run uses one of three backbones ("arch"): the preset's CIFAR ResNet (``cnn``) for the
contrastive, clustering and distillation methods; a small ViT (``vit``) for MAE, which needs one,
with SimCLR on that ViT too as the contrastive reference (``simclr@vit``); and the seed hybrid
``keel_tiny`` at 32 px (``hybrid``, total stride 32) for SimMIM, the hierarchical backbone it is
meant for (``simmim@vit`` runs it on the ViT instead). Every backbone used gets a random-init row.

lightly's runs are plain loops written below from lightly's own heads, losses, schedules and
transforms, on the same keel backbone (same initial weights), epochs, batch, optimizer (AdamW
with keel's parameter groups) and per-step warm-up + cosine learning rate, with the same head
sizes and loss settings as the keel run of that method. Their augmentations are lightly's
torchvision transforms set to keel's ``aug`` values, run on PIL images in DataLoader workers.

    python benchmarks/ssl_methods.py --preset cpu          # 2 quiet CPU cores: 14 runs, about 30 min
    python benchmarks/ssl_methods.py --preset gpu          # one GPU: ResNet-18, full 60k, 32 px, bf16
    python benchmarks/ssl_methods.py --preset tiny         # smoke check of the script: ~5 min on 2 cores
    python benchmarks/ssl_methods.py --methods simclr,byol --no-lightly train.epochs=5
    python benchmarks/ssl_methods.py --methods swav --no-keel train.epochs=20   # lightly's SwAV alone
    python benchmarks/ssl_methods.py --methods simmim,simmim@vit --no-lightly    # SimMIM on both backbones
    python benchmarks/ssl_methods.py --methods swav --no-lightly --per-crop     # BatchNorm per crop
    python benchmarks/ssl_methods.py --methods swav --no-keel --keel-views      # lightly fed keel's views
    python benchmarks/ssl_methods.py --methods swav --no-keel --keel-method     # keel's SwAV in lightly's loop
    python benchmarks/ssl_methods.py --methods dino --no-keel --keel-method --per-crop   # keel's DINO, lightly's way

A method runs only if keel has it (``keel.tasks.ssl.<name>`` imports); others print "skipped".
Each run trains and is evaluated in a fresh process (same start state, its own peak memory); a
run that fails is reported as failed and the others go on. ``train.compile=true`` only applies
to keel's runs.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import json
import multiprocessing
import os
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.config import RunConfig, load_config
from keel.data.sources import build_dataset
from keel.data.views import ViewConfig, local_crop_size
from keel.engine.checkpoint import load_backbone, load_checkpoint
from keel.engine.distributed import resolve_device
from keel.engine.optim import build_optimizer, cosine_lr
from keel.jobs.pretrain import pretrain
from keel.models.registry import model_kwargs
from keel.evaluate.frozen import evaluate_frozen
from keel.evaluate.knn import knn_eval
from keel.evaluate.linear import linear_probe
from keel.models.registry import create_model

METHODS = ["simclr", "swav", "mae", "simmim", "dino", "mocov3", "byol", "simsiam", "rotation", "simclr@vit"]
ARCHS = ("cnn", "vit", "hybrid")
DEFAULT_ARCH = {"mae": "vit", "simmim": "hybrid"}  # the others: cnn
ARCH_LABEL = {"cnn": "CNN", "vit": "ViT", "hybrid": "hybrid"}
SHARED = ["simclr", "byol", "swav", "dino"]  # the methods lightly runs too

PRESETS = {
    # 2 CPU cores, all 14 runs plus evaluation in about 30 min: 4k-image subset, 24 px, 3 epochs
    # of batch 128 (93 steps), kNN bank and probe on a 10k-image subset of the train split.
    "cpu": dict(
        common=["data.img_size=24", "data.subset=4000", "train.epochs=3", "train.batch_size=128",
                "train.warmup_epochs=0.5", "aug.scale_min=0.3", "aug.hue=0.0", "eval.linear_epochs=50"],
        cnn=["model.name=resnet10_cifar", "train.lr=4e-3"],
        vit=["model.name=vit_tiny_patch4_32", "train.lr=1e-3", "train.weight_decay=0.05"],
        # keel_tiny's total stride is 32: its runs (and their evaluation) are at 32 px
        hybrid=["model.name=keel_tiny", "data.img_size=32", "train.lr=1e-3", "train.weight_decay=0.05"],
        eval_train=10000, eval_test=0),
    # One GPU: CIFAR ResNet-18, the full 60k, 32 px, bf16 (precision=auto), batch 512, 15 epochs
    # (about 1-3 min a run on an H100). Evaluated against the whole train split.
    "gpu": dict(
        common=["data.img_size=32", "train.epochs=15", "train.batch_size=512", "train.warmup_epochs=2",
                "aug.scale_min=0.3", "aug.hue=0.0", "eval.linear_epochs=100"],
        cnn=["model.name=resnet18_cifar", "train.lr=2e-3"],
        vit=["model.name=vit_tiny_patch4_32", "train.lr=5e-4", "train.weight_decay=0.05"],
        hybrid=["model.name=keel_tiny", "train.lr=5e-4", "train.weight_decay=0.05"],
        eval_train=0, eval_test=0),
    # A smoke check of the script itself (numbers mean nothing): 512 images at 16 px, 1 epoch.
    "tiny": dict(
        common=["data.img_size=16", "data.subset=512", "train.epochs=1", "train.batch_size=64",
                "train.warmup_epochs=0.5", "aug.scale_min=0.3", "aug.hue=0.0", "eval.linear_epochs=2"],
        cnn=["model.name=resnet10_cifar", "train.lr=4e-3"],
        vit=["model.name=vit_tiny_patch4_32", "train.lr=1e-3", "train.weight_decay=0.05"],
        hybrid=["model.name=keel_tiny", "data.img_size=32", "train.lr=1e-3", "train.weight_decay=0.05"],
        eval_train=1000, eval_test=1000),
}

# Each method's own settings, set explicitly so that keel's and lightly's runs of a shared method
# use the same head sizes and loss parameters (no hidden defaults). Sized for 24-32 px data and
# short runs: EMA teachers start at 0.99, not 0.996, so that they move within ~100-2000 steps.
METHOD_SETTINGS = {
    "simclr": ["method.temperature=0.1", "method.proj_hidden_dim=512", "method.proj_dim=128"],
    "byol": ["method.proj_hidden_dim=1024", "method.proj_dim=256", "method.pred_hidden_dim=1024",
             "method.momentum=0.99"],
    # prototype_bias: lightly's SwaVPrototypes layer has a bias, so keel's run gets one too (same head)
    "swav": ["method.proj_hidden_dim=512", "method.proj_dim=128", "method.num_prototypes=512",
             "method.temperature=0.1", "method.freeze_prototypes_epochs=1", "method.queue_length=0",
             "method.prototype_bias=true", "aug.local_crops=6"],
    # freeze_prototypes_epochs: keel's DINO keeps its last layer fixed that long (lightly: freeze_last_layer)
    "dino": ["method.proj_hidden_dim=512", "method.proj_dim=64", "method.out_dim=2048", "method.momentum=0.99",
             "method.temperature=0.1", "method.teacher_temp=0.04", "method.warmup_teacher_temp_epochs=0",
             "method.center_momentum=0.9", "method.freeze_prototypes_epochs=1", "aug.local_crops=6"],
    "mocov3": ["method.proj_hidden_dim=1024", "method.proj_dim=256", "method.pred_hidden_dim=1024",
               "method.momentum=0.99"],
    "simsiam": [],
    "rotation": [],
    # a decoder for a tiny ViT; the exported feature is the mean of the patch tokens (MAE's
    # fine-tuning choice): MAE never trains the class token directly
    "mae": ["method.decoder_dim=128", "method.decoder_depth=2", "method.decoder_heads=4", "model.global_pool=avg"],
    "simmim": [],
}
NORMALIZE = {"mean": list(ViewConfig().mean), "std": list(ViewConfig().std)}  # what keel's eval uses


# ------------------------------------------------------------------------------------ measuring
class PeakMemory:
    """Peak memory of the code inside ``with``, in MiB above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: the process's peak resident
    set (VmHWM), reset on entry through /proc/self/clear_refs (Linux); without it, the growth of
    ``ru_maxrss``, which misses peaks below an earlier one. DataLoader workers are other
    processes: their memory is not counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = float("nan")
        if device.type == "cuda":
            self.how = "CUDA max_memory_allocated above the start"
        elif os.access("/proc/self/clear_refs", os.W_OK):
            self.how = "peak RSS (VmHWM) above the start"
        else:
            self.how = "growth of ru_maxrss (peaks below an earlier one are missed)"

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.how.startswith("peak RSS"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.start = self._status_kb("VmRSS")
        else:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.how.startswith("peak RSS"):
            self.mb = (self._status_kb("VmHWM") - self.start) / 1024
        else:
            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start) / 1024
        return False


def eval_splits(preset: str, size: int):
    """The kNN bank / linear-probe training images and the test images (all of them, or the preset's subsets)."""
    p = PRESETS[preset]
    return (build_dataset("fashion-mnist", "train", size, subset=p["eval_train"], seed=0),
            build_dataset("fashion-mnist", "test", size, subset=p["eval_test"], seed=0))


def evaluate(backbone: nn.Module, size: int, preset: str, device, linear_epochs: int) -> dict:
    train, test = eval_splits(preset, size)
    amp = torch.bfloat16 if device.type == "cuda" else None
    r = evaluate_frozen(backbone.to(device), train, test, size, device, ks=(20, 200), temperature=0.1,
                        linear_epochs=linear_epochs, amp_dtype=amp)
    return {"knn200": r["knn_top1@200"], "knn20": r["knn_top1@20"], "linear": r["linear_top1"]}


def pixel_baseline(preset: str, linear_epochs: int, device) -> dict:
    """Flattened 28x28 pixels through the same kNN and linear protocols (as ssl_fashion_mnist.py's
    ``raw_pixels``, but on the same train/test subsets as the backbones here)."""
    tr, te = eval_splits(preset, 28)
    xtr, xte = tr.images[:, 0].flatten(1).float() / 255, te.images[:, 0].flatten(1).float() / 255
    r = knn_eval(xtr, tr.labels, xte, te.labels, ks=(20, 200), temperature=0.1)
    r.update(linear_probe(xtr, tr.labels, xte, te.labels, epochs=linear_epochs, device=device))
    return {"knn200": r["knn_top1@200"], "knn20": r["knn_top1@20"], "linear": r["linear_top1"]}


# ------------------------------------------------------------------------------------ keel runs
def keel_run(cfg: RunConfig, run_dir: Path, device) -> tuple[nn.Module, dict]:
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        result = pretrain(cfg, run_dir, quiet=True)
        train_s = time.perf_counter() - t0
    images = min(cfg.data.subset, 60000) if cfg.data.subset else 60000
    epochs = result["steps"] / (images // cfg.train.batch_size)
    return load_backbone(run_dir), {"train_s": train_s, "epochs": epochs, "peak_mb": mem.mb,
                                    "final_loss": result["loss"]}


def keel_student(cfg: RunConfig, run_dir) -> nn.Module:
    """The trained backbone from a keel run's last checkpoint (DINO exports its teacher instead)."""
    student = create_model(cfg.model.name, **model_kwargs(cfg))
    state = load_checkpoint(run_dir)["method"]
    student.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    return student


# ---------------------------------------------------------------------------------- lightly runs
@dataclass
class LightlyRun:
    module: nn.Module                 # every trained and EMA part (moved to the device together)
    transform: Callable               # PIL image -> list of views
    loss: Callable                    # (views on the device, step) -> loss, called under autocast
    after_backward: Callable | None = None   # (step) -> None, between backward and the optimizer step
    after_step: Callable | None = None       # (step) -> None, after the optimizer step
    export: Callable | None = None           # () -> the backbone to evaluate (default: the one trained)


def fp32(criterion, *outs, **kw):
    """A lightly loss on float32 inputs outside autocast (keel computes its losses in float32)."""
    cast = lambda o: [t.float() for t in o] if isinstance(o, (list, tuple)) else o.float()  # noqa: E731
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        return criterion(*[cast(o) for o in outs], **kw)


def lightly_aug(cfg: RunConfig) -> dict:
    """keel's ``aug`` section in lightly's transform arguments (blur and solarization off unless set)."""
    a = cfg.aug
    return dict(hf_prob=a.hflip, cj_prob=a.jitter_p, cj_strength=1.0, cj_bright=a.jitter, cj_contrast=a.jitter,
                cj_sat=a.jitter, cj_hue=a.hue, random_gray_scale=a.gray_p, normalize=NORMALIZE)


def color_jitters(transform) -> list[tuple]:
    """(brightness, contrast, saturation, hue) ranges of every ColorJitter inside a torchvision transform."""
    found: list[tuple] = []

    def walk(t):
        if type(t).__name__ == "ColorJitter":
            found.append((t.brightness, t.contrast, t.saturation, t.hue))
        for child in (getattr(t, "transform", None), *(getattr(t, "transforms", None) or [])):
            if child is not None:
                walk(child)
    walk(transform)
    return found


def check_same_jitter(views) -> None:
    """Fail the run (its row says why) if lightly's views do not all get the same colour jitter,
    as keel's augmentation gives every view."""
    jitters = [color_jitters(v) for v in views]
    if any(j != jitters[0] for j in jitters) or not jitters[0]:
        raise ValueError(f"lightly's views jitter colour differently, not keel's augmentation: {jitters}")


def local_views(cfg: RunConfig) -> tuple[int, int]:
    return cfg.aug.local_crops, cfg.aug.local_size or local_crop_size(cfg.data.img_size)


def lightly_simclr(backbone, cfg, steps_per_epoch, total_steps) -> LightlyRun:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    m = cfg.method
    model = nn.Sequential(backbone, SimCLRProjectionHead(backbone.num_features, m.proj_hidden_dim, m.proj_dim))
    criterion = NTXentLoss(temperature=m.temperature)

    def loss(views, step):
        x0, x1 = views
        return fp32(criterion, model(x0), model(x1))

    transform = SimCLRTransform(input_size=cfg.data.img_size, min_scale=cfg.aug.scale_min,
                                gaussian_blur=cfg.aug.blur_p, **lightly_aug(cfg))
    return LightlyRun(model, transform, loss)


def lightly_byol(backbone, cfg, steps_per_epoch, total_steps) -> LightlyRun:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import BYOLTransform
    from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule
    m = cfg.method
    online = nn.Sequential(backbone, BYOLProjectionHead(backbone.num_features, m.proj_hidden_dim, m.proj_dim))
    predictor = BYOLPredictionHead(m.proj_dim, m.pred_hidden_dim, m.proj_dim)
    target = copy.deepcopy(online)
    deactivate_requires_grad(target)
    criterion = NegativeCosineSimilarity()

    def loss(views, step):
        update_momentum(online, target, m=cosine_schedule(step, total_steps, m.momentum, 1.0))
        x0, x1 = views
        p0, p1 = predictor(online(x0)), predictor(online(x1))
        with torch.no_grad():
            z0, z1 = target(x0), target(x1)
        return 0.5 * (fp32(criterion, p0, z1) + fp32(criterion, p1, z0))

    # keel's two views come from one aug section: both lightly views get the same settings.
    kw = dict(input_size=cfg.data.img_size, min_scale=cfg.aug.scale_min, gaussian_blur=cfg.aug.blur_p,
              solarization_prob=0.0, **lightly_aug(cfg))
    transform = BYOLTransform(BYOLView1Transform(**kw), BYOLView2Transform(**kw))
    return LightlyRun(nn.ModuleList([online, predictor, target]), transform, loss)


def lightly_swav(backbone, cfg, steps_per_epoch, total_steps) -> LightlyRun:
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from lightly.transforms import SwaVTransform
    m, a = cfg.method, cfg.aug
    projector = SwaVProjectionHead(backbone.num_features, m.proj_hidden_dim, m.proj_dim)
    prototypes = SwaVPrototypes(m.proj_dim, m.num_prototypes,
                                n_steps_frozen_prototypes=round(m.freeze_prototypes_epochs * steps_per_epoch))
    criterion = SwaVLoss(temperature=m.temperature, sinkhorn_iterations=m.sinkhorn_iters,
                         sinkhorn_epsilon=m.sinkhorn_eps)

    def loss(views, step):
        prototypes.normalize()
        scores = [prototypes(F.normalize(projector(backbone(v)), dim=1), step) for v in views]
        return fp32(criterion, scores[:2], scores[2:])

    n_local, local_size = local_views(cfg)
    transform = SwaVTransform(crop_sizes=(cfg.data.img_size, local_size), crop_counts=(2, n_local),
                              crop_min_scales=(a.scale_min, a.local_scale_min),
                              crop_max_scales=(1.0, a.local_scale_max), gaussian_blur=a.blur_p, **lightly_aug(cfg))
    return LightlyRun(nn.ModuleList([backbone, projector, prototypes]), transform, loss)


def lightly_dino(backbone, cfg, steps_per_epoch, total_steps) -> LightlyRun:
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform
    from lightly.transforms.dino_transform import DINOViewTransform
    from lightly.utils.scheduler import cosine_schedule
    m, a = cfg.method, cfg.aug
    def head():
        return DINOProjectionHead(backbone.num_features, m.proj_hidden_dim, m.proj_dim, m.out_dim,
                                  freeze_last_layer=round(m.freeze_prototypes_epochs))

    student = nn.Sequential(backbone, head())
    # The teacher starts equal to the student, as in DINO (loaded, not deep-copied: the head's
    # weight-normed last layer cannot be deep-copied).
    teacher = nn.Sequential(copy.deepcopy(backbone), head())
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=m.out_dim, warmup_teacher_temp=m.warmup_teacher_temp,
                         teacher_temp=m.teacher_temp, warmup_teacher_temp_epochs=int(m.warmup_teacher_temp_epochs),
                         student_temp=m.temperature, center_momentum=m.center_momentum)

    def loss(views, step):
        update_momentum(student, teacher, m=cosine_schedule(step, total_steps, m.momentum, 1.0))
        with torch.no_grad():
            t_out = [teacher(v) for v in views[:2]]
        s_out = [student(v) for v in views]
        return fp32(criterion, t_out, s_out, epoch=step // steps_per_epoch)

    def after_backward(step):
        student[1].cancel_last_layer_gradients(current_epoch=step // steps_per_epoch)

    n_local, local_size = local_views(cfg)
    b = a.blur_p
    transform = DINOTransform(global_crop_size=cfg.data.img_size, global_crop_scale=(a.scale_min, 1.0),
                              local_crop_size=local_size, local_crop_scale=(a.local_scale_min, a.local_scale_max),
                              n_local_views=n_local, gaussian_blur=(b, b, b), solarization_prob=0.0,
                              **lightly_aug(cfg))
    # lightly's DINOTransform does not pass cj_strength on to its second global crop, which so
    # gets its view default, half the colour jitter of the other crops. The official DINO and
    # keel jitter every crop alike, and the comparison is meant to use the same augmentation.
    transform.transforms[1] = DINOViewTransform(crop_size=cfg.data.img_size, crop_scale=(a.scale_min, 1.0),
                                                gaussian_blur=b, solarization_prob=0.0, **lightly_aug(cfg))
    return LightlyRun(nn.ModuleList([student, teacher, criterion]), transform, loss, after_backward)


LIGHTLY = {"simclr": lightly_simclr, "byol": lightly_byol, "swav": lightly_swav, "dino": lightly_dino}


class PILViews(torch.utils.data.Dataset):
    """uint8 (3, H, W) images -> PIL -> lightly's multi-view transform (a list of tensors)."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i].permute(1, 2, 0).numpy()))


def loader_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 1))  # every core but the training loop's


def seed_numpy(worker_id: int) -> None:
    """DataLoader worker_init_fn: lightly's GaussianBlur and RandomSolarization draw from numpy's
    global generator, which the DataLoader does not seed. Unseeded, every worker forks the
    parent's numpy state (the workers blur alike) and, with blur or solarization on, no two
    runs of a seed see the same views.
    Seeded from the worker's torch seed, which the loader's seeded generator fixes."""
    np.random.seed(torch.initial_seed() % 2**32)


class KeelViews:
    """Ablation (--keel-views): lightly's loop fed keel's views. Batches of uint8 images in a
    seeded order, augmented on the device by keel's own view pipeline for the method (two views
    or multi-crop, from the same ``aug`` section), in place of lightly's PIL transforms in
    DataLoader workers. Everything else in lightly's run stays lightly's."""

    def __init__(self, name: str, cfg: RunConfig, images: torch.Tensor, device):
        from keel.tasks.ssl import build_method
        # a throwaway method object, for its make_views alone (its backbone is never called)
        self.make_views = build_method(name, create_model(cfg.model.name, **model_kwargs(cfg)), cfg).make_views
        self.images, self.device, self.cfg = images, device, cfg
        self.epoch = 0

    @staticmethod
    def order(n: int, seed: int, epoch: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))

    @staticmethod
    def generator(seed: int, epoch: int) -> torch.Generator:
        """One generator for all the views of an epoch (keel's trainer seeds one per step)."""
        return torch.Generator().manual_seed(seed + 1000 * (epoch + 1))

    def __iter__(self):
        tc = self.cfg.train
        perm, gen = self.order(len(self.images), tc.seed, self.epoch), self.generator(tc.seed, self.epoch)
        self.epoch += 1
        for s in range(len(self.images) // tc.batch_size):
            batch = self.images[perm[s * tc.batch_size:(s + 1) * tc.batch_size]].to(self.device)
            with torch.no_grad():
                views = self.make_views(batch, gen)
            yield views  # outside no_grad: a generator suspended inside it would keep the loop's grad off


def keel_method_run(name: str, backbone: nn.Module, cfg: RunConfig, steps_per_epoch: int, total_steps: int,
                    transform: Callable) -> LightlyRun:
    """Ablation (--keel-method): keel's method module (its heads, loss and hooks) in lightly's loop,
    on lightly's views. The hooks are called where keel's trainer calls them."""
    from keel.tasks.ssl import build_method
    method = build_method(name, backbone, cfg)

    def loss(views, step):
        method.on_step_start(step, steps_per_epoch, total_steps)
        return method(views)["loss"]

    def after_backward(step):
        method.before_optimizer_step(step, steps_per_epoch)

    def after_step(step):
        method.on_step_end(step, total_steps)

    # lightly's loops are evaluated on what they train (DINO: the student, not keel's exported
    # teacher): this run is too, so that only the module differs from lightly's row
    return LightlyRun(method, transform, loss, after_backward, after_step, lambda: method.backbone)


def lightly_fit(name: str, cfg: RunConfig, device, keel_views: bool = False,
                keel_method: bool = False) -> tuple[nn.Module, dict]:
    """The loop every lightly method shares: keel's optimizer groups and lr schedule, autocast as keel.
    Ablations: ``keel_views`` draws the views with keel's augmentation instead of lightly's
    transforms; ``keel_method`` trains keel's method module instead of lightly's heads and loss
    (keel's DINO head, drawn from the same seed, starts from lightly's initial weights)."""
    tc = cfg.train
    data = build_dataset("fashion-mnist", "train", cfg.data.img_size, subset=cfg.data.subset, seed=tc.seed)
    steps_per_epoch = len(data) // tc.batch_size
    total_steps = tc.epochs * steps_per_epoch
    max_steps = min(total_steps, tc.max_steps) if tc.max_steps else total_steps
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        torch.manual_seed(tc.seed)  # the same initial backbone weights as keel's run
        backbone = create_model(cfg.model.name, **model_kwargs(cfg))
        run = LIGHTLY[name](backbone, cfg, steps_per_epoch, total_steps)
        check_same_jitter(run.transform.transforms)
        if keel_method:  # built from the same initial backbone; lightly's heads are dropped
            torch.manual_seed(tc.seed)
            backbone = create_model(cfg.model.name, **model_kwargs(cfg))
            run = keel_method_run(name, backbone, cfg, steps_per_epoch, total_steps, run.transform)
        run.module.to(device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            if tc.channels_last:
                run.module.to(memory_format=torch.channels_last)
        if keel_views:
            loader = KeelViews(name, cfg, data.images, device)
        else:
            loader = torch.utils.data.DataLoader(
                PILViews(data.images, run.transform), batch_size=tc.batch_size, shuffle=True, drop_last=True,
                num_workers=loader_workers(), persistent_workers=True, pin_memory=device.type == "cuda",
                worker_init_fn=seed_numpy, generator=torch.Generator().manual_seed(tc.seed))
        lr = tc.lr * tc.batch_size / 256
        optimizer = build_optimizer(tc.optimizer, run.module, lr, tc.weight_decay, tc.momentum,
                                    fused=device.type == "cuda")
        precision = tc.precision if tc.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        warmup = round(tc.warmup_epochs * steps_per_epoch)
        run.module.train()
        step, loss = 0, torch.zeros(())
        while step < max_steps:
            for views in loader:
                views = [v.to(device, non_blocking=True) for v in views]
                for g in optimizer.param_groups:
                    g["lr"] = cosine_lr(step, total_steps, lr, warmup, tc.min_lr)
                with amp:
                    loss = run.loss(views, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tc.clip_grad > 0:
                    nn.utils.clip_grad_norm_(run.module.parameters(), tc.clip_grad)
                if run.after_backward:
                    run.after_backward(step)
                optimizer.step()
                if run.after_step:
                    run.after_step(step)
                step += 1
                if step >= max_steps:
                    break
        final_loss = loss.item()  # also waits for the device
        train_s = time.perf_counter() - t0
    del loader
    if run.export:
        backbone = run.export()
    return backbone, {"train_s": train_s, "epochs": step / steps_per_epoch, "peak_mb": mem.mb,
                      "final_loss": final_loss}


# ------------------------------------------------------------------------------------ the report
def method_config(preset: str, method: str, arch: str, overrides: list[str]) -> RunConfig:
    p = PRESETS[preset]
    return load_config(None, ["data.source=fashion-mnist", "train.knn_every=0", *p["common"],
                              *p[arch], f"method.name={method}",
                              *METHOD_SETTINGS.get(method, []), *overrides])


def per_crop_forward() -> None:
    """Ablation (--per-crop): keel's SwAV and DINO (student and teacher) call the backbone once
    per crop, as lightly's loops do, instead of once per resolution (the official code's way).
    Changes which images each BatchNorm batch holds, nothing else."""
    from keel.tasks.ssl import dino, swav
    swav.SwAV.embed = lambda self, views: torch.cat([self.projector(self.backbone.embed(v)) for v in views])
    dino._same_size_runs = list


def run_one(impl: str, method: str, arch: str, preset: str, overrides: list[str], run_dir: str,
            per_crop: bool = False, keel_views: bool = False, keel_method: bool = False) -> None:
    """Train one backbone and evaluate it; the row goes to run_dir/row.json. Runs in a fresh
    process, so that every run starts from the same state and its peak memory is its own."""
    cfg = method_config(preset, method, arch, overrides)
    if per_crop and (impl == "keel" or keel_method):
        per_crop_forward()
    label = f"{impl} {method}" + (f" ({ARCH_LABEL[arch]})" if arch != DEFAULT_ARCH.get(method, "cnn") else "")
    row = {"name": label, "impl": impl, "method": method, "arch": arch, "backbone": cfg.model.name,
           "img_size": cfg.data.img_size}
    print(f"{label} · {cfg.model.name} · {cfg.data.subset or 60000} images · {cfg.train.epochs} epochs · "
          f"batch {cfg.train.batch_size} ...", flush=True)
    try:
        device = resolve_device(cfg.train.device)
        # One-time costs outside the clock: decoding the data, and imports the loops would do lazily.
        build_dataset("fashion-mnist", "train", cfg.data.img_size)
        importlib.import_module("keel.show")
        importlib.import_module("torch.utils.tensorboard")
        if impl == "lightly":
            for name in ("lightly.loss", "lightly.models.modules", "lightly.transforms"):
                importlib.import_module(name)
        if impl == "keel":
            backbone, stats = keel_run(cfg, Path(run_dir), device)
        else:
            backbone, stats = lightly_fit(method, cfg, device, keel_views, keel_method)
        row.update(stats, s_per_epoch=stats["train_s"] / max(stats["epochs"], 1e-9))
        row.update(evaluate(backbone, cfg.data.img_size, preset, device, cfg.eval.linear_epochs))
        if impl == "keel" and method == "dino":
            # keel exports DINO's teacher; lightly's loop trains (and we evaluate) its student.
            # The student, from the last checkpoint, is the like-for-like comparison.
            row["student"] = evaluate(keel_student(cfg, run_dir).eval(), cfg.data.img_size, preset, device,
                                      cfg.eval.linear_epochs)
        print(f"  train {row['train_s']:.0f} s ({row['s_per_epoch']:.1f} s/epoch), peak {row['peak_mb']:.0f} MB, "
              f"kNN@200 {row['knn200']:.2f}, kNN@20 {row['knn20']:.2f}, linear {row['linear']:.2f}", flush=True)
    except Exception as e:  # a broken method must not stop the others
        traceback.print_exc()
        msg = str(e).splitlines()[0][:100] if str(e) else ""
        row["error"] = f"failed: {type(e).__name__}: {msg}"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "row.json").write_text(json.dumps(row, indent=2))


def run_isolated(impl: str, method: str, arch: str, preset: str, overrides: list[str], run_dir: Path,
                 per_crop: bool = False, keel_views: bool = False, keel_method: bool = False) -> dict:
    proc = multiprocessing.get_context("spawn").Process(
        target=run_one, args=(impl, method, arch, preset, overrides, str(run_dir), per_crop, keel_views, keel_method))
    proc.start()
    proc.join()
    row_file = run_dir / "row.json"
    if row_file.is_file():
        return json.loads(row_file.read_text())
    return {"name": f"{impl} {method}", "impl": impl, "method": method, "arch": arch, "backbone": "?",
            "error": f"failed: the run's process exited with code {proc.exitcode}"}


def available(method: str) -> bool:
    try:
        importlib.import_module(f"keel.tasks.ssl.{method}")
        return True
    except ImportError:
        return False


def fmt(v, spec=".2f"):
    return "—" if v is None or v != v else format(v, spec)


def markdown(rows: list[dict], title: str, notes: list[str]) -> str:
    head = ["run", "backbone", "kNN@200", "kNN@20", "linear", "train s", "s/epoch", "peak MB",
            "keel÷lightly kNN@200", "keel÷lightly linear", "keel÷lightly s/epoch"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['backbone']} | {r['error']} |" + " |" * (len(head) - 3))
            continue
        ratio = r.get("vs_lightly", {})
        cells = [r["name"], r["backbone"], fmt(r.get("knn200")), fmt(r.get("knn20")), fmt(r.get("linear")),
                 fmt(r.get("train_s"), ".0f"), fmt(r.get("s_per_epoch"), ".1f"), fmt(r.get("peak_mb"), ".0f"),
                 fmt(ratio.get("knn200"), ".3f"), fmt(ratio.get("linear"), ".3f"), fmt(ratio.get("s_per_epoch"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="keel methods, comma-separated; name@cnn, name@vit or name@hybrid picks the "
                         "backbone (default: mae on the ViT, simmim on the hybrid, the others on the CNN)")
    ap.add_argument("--no-lightly", action="store_true", help="skip lightly's runs")
    ap.add_argument("--no-keel", action="store_true",
                    help="skip keel's runs (lightly's alone, e.g. to add them to an earlier --no-lightly run)")
    ap.add_argument("--per-crop", action="store_true",
                    help="ablation: keel's SwAV and DINO (in keel's runs, and in lightly's loop with "
                         "--keel-method) call the backbone once per crop (lightly's way), not once per resolution")
    ap.add_argument("--keel-views", action="store_true",
                    help="ablation: lightly's loops take their views from keel's batched augmentation "
                         "instead of lightly's PIL transforms (tells augmentation from the rest)")
    ap.add_argument("--keel-method", action="store_true",
                    help="ablation: lightly's loops train keel's method module (heads, loss, hooks) instead of "
                         "lightly's (with --keel-views: keel's "
                         "method and views in lightly's loop; with --per-crop: one backbone call per crop)")
    ap.add_argument("--out", default="", help="output folder (default runs/bench-ssl-methods/<preset>-<time>)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.epochs=4 "
                    "(they come last: model.name=... would replace the backbone of every run)")
    args = ap.parse_args()

    out = Path(args.out or f"runs/bench-ssl-methods/{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    cfgs = {arch: method_config(args.preset, "simclr", arch, args.overrides) for arch in ARCHS}
    device = resolve_device(cfgs["cnn"].train.device)

    # What to run: (impl, method, arch)
    items = [s.strip() for s in args.methods.split(",") if s.strip()]
    plan, skipped = [], []
    for item in items:
        method, _, where = item.partition("@")
        if args.no_keel:
            continue
        if where and where not in ARCHS:
            ap.error(f"--methods {item}: the backbone after @ must be one of {', '.join(ARCHS)}")
        if available(method):
            plan.append(("keel", method, where or DEFAULT_ARCH.get(method, "cnn")))
        else:
            skipped.append(f"keel {item}")
            print(f"keel {item}: skipped (not available)", flush=True)
    if not args.no_lightly:
        lightly_ok = importlib.util.find_spec("lightly") is not None
        for method in [m for m in SHARED if m in items]:
            if lightly_ok:
                plan.append(("lightly", method, "cnn"))
            else:
                skipped.append(f"lightly {method}")
                print(f"lightly {method}: skipped (lightly is not installed)", flush=True)

    t_start = time.perf_counter()
    rows = [run_isolated(impl, method, arch, args.preset, args.overrides, out / f"{impl}-{method}-{arch}",
                         args.per_crop, args.keel_views, args.keel_method)
            for impl, method, arch in plan]

    # DINO's student gets its own row: it is what lightly's DINO row measures
    for r in list(rows):
        if "student" in r:
            rows.insert(rows.index(r) + 1, {**{k: v for k, v in r.items() if k != "student"}, **r["student"],
                                            "name": f"{r['name']} (student)"})
    # keel ÷ lightly, for the methods both ran on the same backbone (DINO: student against student)
    for method in SHARED:
        k = next((r for r in rows if r["name"] == f"keel {method} (student)" and "error" not in r), None) or \
            next((r for r in rows if r["name"] == f"keel {method}" and "error" not in r), None)
        li = next((r for r in rows if r["name"] == f"lightly {method}" and "error" not in r), None)
        if k and li:
            k["vs_lightly"] = {m: k[m] / li[m] for m in ("knn200", "linear", "s_per_epoch")}

    print("baselines: random init and raw pixels ...", flush=True)
    seen = set()  # (backbone, size): an override such as model.name=... can make two archs one
    for arch in ARCHS:
        cfg = cfgs[arch]
        key = (cfg.model.name, cfg.data.img_size)
        if key not in seen and any(not r.get("error") and r.get("arch") == arch for r in rows):
            seen.add(key)
            torch.manual_seed(cfg.train.seed)  # the weights every run of this backbone started from
            bb = create_model(cfg.model.name, **model_kwargs(cfg))
            rows.append({"name": f"random init ({ARCH_LABEL[arch]})", "impl": "baseline", "arch": arch,
                         "backbone": cfg.model.name, "img_size": cfg.data.img_size,
                         **evaluate(bb, cfg.data.img_size, args.preset, device, cfg.eval.linear_epochs)})
    rows.append({"name": "raw pixels", "impl": "baseline", "backbone": "28×28 pixels",
                 **pixel_baseline(args.preset, cfgs["cnn"].eval.linear_epochs, device)})
    total_s = time.perf_counter() - t_start

    device_name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    p = PRESETS[args.preset]
    workers = loader_workers()
    notes = [
        f"device: {device_name}; whole benchmark {total_s / 60:.1f} min; peak MB: {PeakMemory(device).how}, "
        "each run in its own process" + ("; lightly's DataLoader workers not counted" if device.type == "cpu" else ""),
        f"evaluation: kNN bank and linear-probe training set = {p['eval_train'] or 60000} train images, "
        f"tested on {p['eval_test'] or 10000} test images",
        "keel÷lightly: the keel row over the lightly row of the same method (accuracy above 1: keel better; "
        "s/epoch below 1: keel faster)",
        "train s: wall time of pretraining (keel: pretrain(), incl. the backbone export; lightly: heads, "
        "DataLoader workers and the loop); s/epoch = train s / epochs",
        f"lightly: PIL + torchvision transforms in {workers} DataLoader worker{'s' if workers > 1 else ''}; "
        "keel: batched augmentation on the training device",
        f"settings: {' '.join(p['common'])}; CNN: {' '.join(p['cnn'])}; ViT: {' '.join(p['vit'])}; "
        f"hybrid: {' '.join(p['hybrid'])}"
        + (f"; overrides: {' '.join(args.overrides)}" if args.overrides else ""),
    ]
    if args.per_crop:
        notes.append("--per-crop: keel's SwAV and DINO called the backbone once per crop, not once per resolution")
    if args.keel_views:
        notes.append("--keel-views: lightly's runs drew their views with keel's batched augmentation, "
                     "not lightly's transforms")
    if args.keel_method:
        notes.append("--keel-method: lightly's runs trained keel's method module (heads, loss, hooks), "
                     "not lightly's")
    if skipped:
        notes.append("skipped (not available): " + ", ".join(skipped))
    title = f"Fashion-MNIST, {args.preset} preset"
    md = markdown(rows, title, notes)
    print("\n" + md)
    (out / "ssl_methods.md").write_text(md)
    report = {"preset": args.preset, "overrides": args.overrides, "preset_settings": p,
              "method_settings": METHOD_SETTINGS, "device": device_name, "total_seconds": round(total_s, 1),
              "notes": notes, "rows": rows}
    (out / "ssl_methods.json").write_text(json.dumps(report, indent=2))
    # One group of bars per run (plot_comparison groups by the inner keys), one bar per metric.
    done = [r for r in rows if "knn200" in r]
    from keel.show import plot_comparison
    plot_comparison({metric: {r["name"]: r[key] for r in done} for metric, key in
                     (("kNN@200", "knn200"), ("kNN@20", "knn20"), ("linear", "linear"))},
                    out / "ssl_methods.png", title=title)
    print(f"written: {out / 'ssl_methods.md'}, {out / 'ssl_methods.json'}, {out / 'ssl_methods.png'}")


if __name__ == "__main__":
    main()
