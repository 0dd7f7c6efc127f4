"""The training loop every method uses. Read it top to bottom.

Reproducibility is by construction: the data order of epoch e comes from a generator seeded
with (seed, e), and every random choice inside step s (augmentations, drop-path) from one seeded
with (seed, s, rank). A run resumed from any checkpoint therefore continues exactly as if it
had never stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from keel.config import RunConfig, save_config, to_dict
from keel.data.sources import collate_skip
from keel.engine import distributed as D
from keel.engine.checkpoint import export_backbone, load_checkpoint, save_checkpoint
from keel.engine.optim import build_optimizer, cosine_lr, cosine_wd


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...); the message says what to do."""


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, quiet: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.quiet = quiet
        self.dist = D.init_distributed(cfg.train.device)
        self.device = self.dist.device
        p = cfg.train.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp32": None}[p]
        self.history: dict[str, list] = {"loss": [], "knn": []}
        self.skipped: set[int] = set()

    # ---------------------------------------------------------------- data order
    def _epoch_batches(self, n: int, epoch: int) -> list[torch.Tensor]:
        """This rank's index batches for one epoch: a seeded permutation, split across ranks."""
        bs, world = self.cfg.train.batch_size, self.dist.world_size
        g = torch.Generator().manual_seed(D.seed_for(self.cfg.train.seed, epoch))
        perm = torch.randperm(n, generator=g)
        steps = n // bs
        local = bs // world
        return [perm[s * bs + self.dist.rank * local: s * bs + (self.dist.rank + 1) * local] for s in range(steps)]

    def _batches(self, data, batches: list[torch.Tensor]):
        """Yield uint8 image batches on the device, from memory or through decoding workers."""
        if hasattr(data, "images"):  # in-memory (built-in) data: index directly, no workers needed
            images = self._resident if self._resident is not None else data.images
            for idx in batches:
                yield images[idx.to(images.device)].to(self.device, non_blocking=True)
            return
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=[b.tolist() for b in batches], num_workers=self.cfg.data.num_workers,
            collate_fn=collate_skip, pin_memory=self.device.type == "cuda",
            persistent_workers=False)
        for idx, batch in zip(batches, loader):
            self.skipped.update(batch["skipped"].tolist())
            images = batch["images"]
            if len(images) == 0:
                raise TrainingError(f"no image of a batch of {len(idx)} could be decoded ({len(self.skipped)} "
                                    f"files skipped so far): is data.source really a folder of images?")
            if len(images) < len(idx):
                # Refill from the batch's own good images: every process keeps the same batch
                # size (collectives need it) and compiled graphs keep a static shape.
                images = images[torch.arange(len(idx)) % len(images)]
            yield images.to(self.device, non_blocking=True)

    # ---------------------------------------------------------------- the loop
    def fit(self, method: nn.Module, data, monitor=None, init_from: str | Path | None = None) -> dict:
        """Train ``method`` on ``data``; ``monitor`` = (train_ds, test_ds) enables the kNN monitor.
        ``init_from``: a previous stage's run directory whose weights and optimizer state this run
        starts from (ignored when resuming: the run's own checkpoint already holds them)."""
        cfg, tc, is_main = self.cfg, self.cfg.train, self.dist.is_main
        if tc.batch_size % self.dist.world_size:
            raise TrainingError(f"train.batch_size {tc.batch_size} is not divisible by {self.dist.world_size} processes")
        steps_per_epoch = len(data) // tc.batch_size
        if steps_per_epoch == 0:
            raise TrainingError(f"{len(data)} images is less than one batch of {tc.batch_size}: lower train.batch_size")
        total_steps = tc.epochs * steps_per_epoch
        warmup_steps = round(tc.warmup_epochs * steps_per_epoch)
        lr = tc.lr * tc.batch_size / 256
        torch.manual_seed(tc.seed)  # heads built before fit() were seeded by the caller

        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        method.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            if tc.channels_last:
                method.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(tc.optimizer, method, lr, tc.weight_decay, tc.momentum,
                                    fused=self.device.type == "cuda")
        # Groups that decay, decided on the fresh optimizer (norms and biases: 0) before any
        # state is loaded; a scheduled weight decay only ever touches these.
        decays = [g["weight_decay"] > 0 for g in optimizer.param_groups]
        if tc.weight_decay_end is not None and not any(decays):
            raise TrainingError(f"train.weight_decay_end={tc.weight_decay_end} schedules the weight decay from "
                                f"train.weight_decay={tc.weight_decay}, which must be > 0")
        step = 0
        if init_from is not None and not self.resume:
            from keel.engine.stages import carry_over
            moved = carry_over(method, optimizer, load_checkpoint(init_from, map_location=self.device))
            if is_main and not self.quiet:
                fresh = [k for k in moved["fresh"] if not k.endswith("num_batches_tracked")]
                print(f"starting from {init_from}: {len(moved['carried'])} tensors carried over"
                      + (f", {len(fresh)} new ({', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''})" if fresh else ""))
        if self.resume:
            state = load_checkpoint(self.run_dir, map_location=self.device)
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            saved_bs = state.get("config", {}).get("train", {}).get("batch_size", tc.batch_size)
            if saved_bs != tc.batch_size:
                raise TrainingError(f"the checkpoint was trained with train.batch_size={saved_bs}; resuming with "
                                    f"{tc.batch_size} would not continue the same run")
            step, self.history = state["step"], state["history"]
            self.skipped = set(state.get("skipped", []))
            self._truncate_metrics(step)
            if is_main and not self.quiet:
                print(f"resumed from step {step} ({step / steps_per_epoch:.2f} epochs)")

        # Resident data: built-in datasets live on the GPU, so augmentation never waits on the CPU.
        self._resident = data.images.to(self.device) if (hasattr(data, "images") and self.device.type == "cuda") else None
        model = method
        if self.dist.world_size > 1:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SimCLR's global BN
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if tc.compile:
            model = torch.compile(model)

        writer = self._tb_writer(purge_step=step + 1 if self.resume else None) if is_main else None
        metrics_file = open(self.run_dir / "metrics.jsonl", "a") if is_main else None
        max_steps = min(total_steps, tc.max_steps) if tc.max_steps else total_steps
        bar = tqdm(total=max_steps, initial=step, desc=f"{cfg.method.name}", unit="step", dynamic_ncols=True,
                   disable=not is_main or self.quiet, mininterval=1.0)
        bad = torch.zeros((), device=self.device, dtype=torch.bool)
        last_ckpt = step
        loss_sum = torch.zeros((), device=self.device)
        loss_count, t_log, img_log = 0, time.perf_counter(), 0
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        method.train()
        try:
            while step < max_steps:
                epoch, skip = divmod(step, steps_per_epoch)
                batches = self._epoch_batches(len(data), epoch)[skip:]
                for images in self._batches(data, batches):
                    gen = torch.Generator().manual_seed(D.seed_for(tc.seed, step, self.dist.rank))
                    torch.manual_seed(D.seed_for(tc.seed, step, self.dist.rank, 1))
                    cur_lr = cosine_lr(step, total_steps, lr, warmup_steps, tc.min_lr)
                    for g in optimizer.param_groups:
                        g["lr"] = cur_lr
                    if tc.weight_decay_end is not None:
                        # a function of the step alone, like the lr: a resumed run gets the same values
                        cur_wd = cosine_wd(step, total_steps, tc.weight_decay, tc.weight_decay_end)
                        for g, d in zip(optimizer.param_groups, decays):
                            if d:
                                g["weight_decay"] = cur_wd
                    method.on_step_start(step, steps_per_epoch, total_steps)
                    with torch.no_grad():
                        views = method.make_views(images, gen)
                    with autocast:
                        out = model(views)
                    loss = out["loss"]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if tc.clip_grad > 0:
                        nn.utils.clip_grad_norm_(method.parameters(), tc.clip_grad)
                    method.before_optimizer_step(step, steps_per_epoch)
                    optimizer.step()
                    method.on_step_end(step, total_steps)
                    # Checked lazily (no GPU sync per step); nothing is saved before the check.
                    bad |= ~torch.isfinite(loss.detach())
                    loss_sum += loss.detach().float()
                    loss_count += 1
                    img_log += len(images) * self.dist.world_size
                    step += 1
                    bar.update(1)
                    end_of_epoch = step % steps_per_epoch == 0
                    want_ckpt = (tc.ckpt_every and step % tc.ckpt_every == 0) or step == max_steps or \
                        (not tc.ckpt_every and end_of_epoch)
                    if step % tc.log_every == 0 or want_ckpt or end_of_epoch:
                        self._check_finite(bad, step, last_ckpt)
                        mean_loss = D.all_reduce_mean(loss_sum / loss_count).item()
                        ips = img_log / max(1e-9, time.perf_counter() - t_log)
                        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": mean_loss,
                               "lr": cur_lr, **({"wd": cur_wd} if tc.weight_decay_end is not None else {}),
                               "img_per_s": round(ips, 1),
                               **{k: float(v) for k, v in out.items() if k != "loss"}}
                        self.history["loss"].append([step, mean_loss])
                        if is_main:
                            metrics_file.write(json.dumps(rec) + "\n")
                            metrics_file.flush()
                            if writer:
                                for k, v in rec.items():
                                    if k not in ("step", "epoch"):
                                        writer.add_scalar(f"train/{k}", v, step)
                            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}", lr=f"{cur_lr:.2e}")
                        loss_sum.zero_()
                        loss_count, t_log, img_log = 0, time.perf_counter(), 0
                    if end_of_epoch and monitor and tc.knn_every and (step // steps_per_epoch) % tc.knn_every == 0:
                        self._knn_monitor(method, monitor, step, steps_per_epoch, writer, metrics_file)
                    if want_ckpt:
                        self._save(method, optimizer, step, last=True)
                        last_ckpt = step
                    if step >= max_steps:
                        break
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
            if writer:
                writer.close()

        result = {"steps": step, "loss": self.history["loss"][-1][1] if self.history["loss"] else float("nan"),
                  "knn": self.history["knn"][-1][1] if self.history["knn"] else None,
                  "skipped": len(self.skipped), "run_dir": str(self.run_dir)}
        if is_main:
            self._finish(method, data, result, finished=step >= total_steps)
        D.barrier()
        return result

    # ---------------------------------------------------------------- helpers
    def _check_finite(self, bad: torch.Tensor, step: int, last_ckpt: int) -> None:
        if D.all_reduce_max(bad.to(torch.float32)).item() > 0:
            where = (f"the last good checkpoint (step {last_ckpt}) is kept in {self.run_dir / 'checkpoints'}"
                     if last_ckpt else "no checkpoint had been written yet")
            raise TrainingError(f"loss became NaN or inf at or before step {step}; {where}. "
                                f"Lower train.lr, set train.clip_grad, or use train.precision=fp32.")

    def _save(self, method: nn.Module, optimizer, step: int, last: bool) -> None:
        if not self.dist.is_main:
            return
        state = {"method": method.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "history": self.history, "config": to_dict(self.cfg), "skipped": sorted(self.skipped)}
        save_checkpoint(self.run_dir / "checkpoints" / "last.pt", state)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.dist.is_main or not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep))

    def _tb_writer(self, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
            return None
        # On resume, hide events logged after the checkpoint (they are redone), as for metrics.jsonl.
        return SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)

    def _knn_monitor(self, method, monitor, step, steps_per_epoch, writer, metrics_file) -> None:
        """kNN top-1 (k=20) of the current backbone; computed on rank 0 while others wait."""
        if self.dist.is_main:
            from keel.evaluate.monitor import knn_monitor
            acc = knn_monitor(method.export_backbone(), monitor, self.cfg, self.device, self.amp_dtype)
            epoch = step // steps_per_epoch
            self.history["knn"].append([epoch, acc])
            metrics_file.write(json.dumps({"step": step, "epoch": epoch, "knn_top1": acc}) + "\n")
            metrics_file.flush()
            if writer:
                writer.add_scalar("monitor/knn_top1", acc, step)
            if not self.quiet:
                tqdm.write(f"epoch {epoch}: kNN top-1 {acc:.2f}%")
            method.train()
        D.barrier()

    def _finish(self, method, data, result: dict, finished: bool) -> None:
        cfg = self.cfg
        if self.skipped and getattr(data, "paths", None) is not None:
            (self.run_dir / "skipped.txt").write_text("".join(data.paths[i] + "\n" for i in sorted(self.skipped)))
        card = {
            "model": cfg.model.name,
            "model_kwargs": model_kwargs(cfg),
            "method": cfg.method.name,
            "data": {"source": cfg.data.source, "images": len(data), "skipped": len(self.skipped),
                     "img_size": cfg.data.img_size},
            "epochs": result["steps"] / max(1, len(data) // cfg.train.batch_size),
            "steps": result["steps"],
            "finished": finished,
            "config": to_dict(cfg),
            "metrics": {"final_loss": result["loss"], "knn_top1": result["knn"]},
            "keel_version": _version(),
        }
        export_backbone(method.export_backbone(), self.run_dir, card)
        from keel.show import plot_run
        plot_run(self.history, self.run_dir / "curves.png")
        if not self.quiet and getattr(data, "paths", None) is not None:
            print(f"{len(self.skipped)} files skipped" + (f" (list in {self.run_dir / 'skipped.txt'})" if self.skipped else ""))


def model_kwargs(cfg: RunConfig) -> dict:
    """The create_model keywords a run used: enough to rebuild the backbone from its card."""
    kw = {"img_size": cfg.data.img_size}
    if cfg.model.drop_path_rate:
        kw["drop_path_rate"] = cfg.model.drop_path_rate
    if cfg.model.global_pool:
        kw["global_pool"] = cfg.model.global_pool
    return kw


def _version() -> str:
    from keel import __version__
    return __version__
