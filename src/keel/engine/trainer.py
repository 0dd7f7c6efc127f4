"""The one training loop: pretraining, fine-tuning and every later job. Read it top to bottom.

The trainer knows no task's insides: a :class:`~keel.tasks.base.Task` prepares its batch and
returns its losses, and hooks (:mod:`keel.engine.hooks`) add evaluation, EMA, best checkpoints
and monitors. The trainer owns devices, processes, precision, compile, the optimizer and its
schedules, checkpoints and exact resume, logging, progress and the NaN guard.

Reproducibility is by construction: the data order of epoch e comes from a generator seeded
with (seed, e), and every random choice inside step s from generators seeded with (seed, s) for
draws shared by all processes and (seed, s, rank) for a process's own (augmentations, drop-path).
A run resumed from any checkpoint therefore continues exactly as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from tqdm import tqdm

from keel.config import save_config, to_dict
from keel.data.batches import load_batches
from keel.data.recipes import repeated_batches
from keel.engine import distributed as D
from keel.engine import parallel
from keel.engine.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from keel.engine.optim import apply_lr, build_optimizer, cosine_lr, cosine_wd, step_lr
from keel.engine.stages import carry_over
from keel.errors import TrainingError
from keel.tasks.base import StepRNG, Task
from keel.viz.curves import plot_run


class Trainer:
    """``Trainer(cfg, run_dir).fit(task, data, hooks)``. ``cfg`` has a ``train`` section
    (:class:`keel.config.TrainConfig`, its ``lr`` already resolved) and ``data.num_workers``; it is
    saved as the run's config.yaml."""

    def __init__(self, cfg, run_dir: str | Path | None, resume: bool = False, quiet: bool = False,
                 strict_resume: bool = False):
        self.cfg = cfg
        self.strict_resume = strict_resume   # resume only with the checkpoint's own config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.quiet = quiet
        self.dist = D.init_distributed(cfg.train.device)
        self.device = self.dist.device
        if not resume and cfg.train.auto_resume and self.has_checkpoint() and (D.restarted() or self._same_run()):
            # the same run started again (torchrun's restart, a requeued Slurm job, a restarted pod or
            # Ray worker, the command run twice): carry on from its last checkpoint, lose nothing
            self.resume = True
            if self.is_main and not quiet:
                print(f"resuming {self.run_dir} from its last checkpoint: the same run started again "
                      "(train.auto_resume=false starts it over)")
        self.sharded = cfg.train.parallel == "fsdp"
        p = cfg.train.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp32": None}[p]
        self.history: dict[str, list] = {"loss": [], "knn": [], "eval": []}
        self.skipped: dict[int, str] = {}     # dataset index -> why the file was skipped
        self.step = self.epoch = 0
        self.metrics_file = self.writer = None

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def has_checkpoint(self) -> bool:
        return self.run_dir is not None and has_checkpoint(self.run_dir)

    def _same_run(self) -> bool:
        """Whether the run directory's config.yaml holds this config (the keys a resume may change aside)."""
        try:
            saved = yaml.safe_load((self.run_dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return False
        now = _flat(to_dict(self.cfg))
        return all(_flat(saved).get(k) == v for k, v in now.items() if k not in _RUN_ONLY)

    @property
    def writes(self) -> bool:
        return self.dist.is_main and self.run_dir is not None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    # ---------------------------------------------------------------- data order
    def steps_per_epoch(self, n: int) -> int:
        """``drop_last``: n // batch full batches (the rest waits for the next epoch's order);
        else ceil(n / batch) near-equal batches, so no image is left out and none is tiny."""
        bs = self.cfg.train.batch_size
        return n // bs if self.cfg.train.drop_last else math.ceil(n / bs)

    def epoch_batches(self, n: int, epoch: int) -> list[torch.Tensor]:
        """Every index batch of one epoch (the global batches, alike on every process)."""
        tc = self.cfg.train
        steps = self.steps_per_epoch(n)
        g = torch.Generator().manual_seed(D.seed_for(tc.seed, epoch))
        if tc.repeated_aug > 1:
            return repeated_batches(n, steps, tc.repeated_aug, g)
        perm = torch.randperm(n, generator=g)
        if tc.drop_last:
            return list(perm[:steps * tc.batch_size].view(steps, tc.batch_size))
        return list(perm.tensor_split(steps))

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of a global batch (near-equal parts)."""
        return batch.tensor_split(self.dist.world_size)[self.dist.rank]

    def batches(self, data, epoch: int, skip: int, resident=None):
        """This process's batches of ``epoch`` from step ``skip`` on, each with its ``global_size``."""
        tc, nw = self.cfg.train, self.cfg.data.num_workers
        if hasattr(data, "stream"):
            yield from data.stream(epoch, skip, tc.batch_size, tc.seed, self.dist.rank, self.dist.world_size,
                                   self.device, nw, skipped=self.skipped)
            return
        batches = self.epoch_batches(len(data), epoch)[skip:]
        loaded = load_batches(data, [self.share(b) for b in batches], self.device, nw, refill=True,
                              skipped=self.skipped, resident=resident)
        for idx, batch in zip(batches, loaded):
            batch["global_size"] = len(idx)
            yield batch

    # ---------------------------------------------------------------- the loop
    def fit(self, task: Task, data, hooks=(), init_from: str | Path | None = None) -> dict:
        """Train ``task`` on ``data``. ``init_from``: a previous stage's run directory whose weights
        and optimizer state this run starts from (ignored when resuming: the run's own checkpoint
        already holds them)."""
        cfg, tc, world = self.cfg, self.cfg.train, self.dist.world_size
        self.task, self.data, self.hooks = task, data, list(hooks)
        if tc.batch_size < world:
            raise TrainingError(f"train.batch_size {tc.batch_size} cannot be shared by {world} processes")
        if tc.drop_last and tc.batch_size % world:
            raise TrainingError(f"train.batch_size {tc.batch_size} is not divisible by {world} processes")
        if len(data) < tc.batch_size and not self.resume:
            # a small folder: the largest batch the data allows (recorded in config.yaml), not a stop
            fit = len(data) // world * world
            if fit == 0:
                raise TrainingError(f"{len(data)} images cannot be shared by {world} processes")
            if self.is_main and not self.quiet:
                print(f"train.batch_size: {fit} instead of {tc.batch_size}, the data has {len(data)} images")
            tc.batch_size = fit
        if hasattr(data, "stream"):   # shards: every process reads its own part, in whole batches
            if tc.batch_size % world:
                raise TrainingError(f"train.batch_size {tc.batch_size} is not divisible by {world} processes")
            spe = data.steps_per_epoch(tc.batch_size)
        else:
            spe = self.steps_per_epoch(len(data))
        total_steps = tc.epochs * spe
        warmup_steps = round(tc.warmup_epochs * spe)
        if warmup_steps > tc.warmup_max_fraction * total_steps:
            capped = int(tc.warmup_max_fraction * total_steps)
            if self.is_main and not self.quiet:
                print(f"warm-up: {capped} steps ({capped / spe:.2g} epochs) instead of train.warmup_epochs="
                      f"{tc.warmup_epochs:g}, at most train.warmup_max_fraction={tc.warmup_max_fraction:g} of the run")
            warmup_steps = capped
        lr = tc.lr * tc.batch_size / 256
        self.steps_per_epoch_, self.total_steps = spe, total_steps
        torch.manual_seed(tc.seed)  # heads built before fit() were seeded by the caller

        if tc.parallel not in ("ddp", "fsdp"):
            raise TrainingError(f"train.parallel must be ddp or fsdp, got {tc.parallel!r}")
        if self.sharded and tc.model_ema:
            raise TrainingError("train.model_ema keeps a whole copy of the model on every process: use it with "
                                "train.parallel=ddp")
        if self.writes:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self._check_shared_run_dir()
        plain = task          # under FSDP the caller's task; its weights come back at the end
        if world > 1 and self.device.type == "cuda":
            plain = task = nn.SyncBatchNorm.convert_sync_batchnorm(task)  # e.g. SimCLR's global BN
        task.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            if tc.channels_last:
                task.to(memory_format=torch.channels_last)
        if self.sharded:
            D.ensure_group(self.device)
            task = parallel.shard(plain, self.device, self.amp_dtype)
        if tc.activation_checkpointing:
            parallel.checkpoint_activations(task)
        self.task = task
        groups = task.param_groups(tc.weight_decay, tc.layer_decay)
        optimizer = build_optimizer(tc.optimizer, groups, lr, tc.weight_decay, tc.momentum,
                                    fused=self.device.type == "cuda")
        self.optimizer = optimizer
        # Groups that decay, decided on the fresh optimizer (norms and biases: 0) before any
        # state is loaded; a scheduled weight decay only ever touches these.
        decays = [g["weight_decay"] > 0 for g in optimizer.param_groups]
        if tc.weight_decay_end is not None and not any(decays):
            raise TrainingError(f"train.weight_decay_end={tc.weight_decay_end} schedules the weight decay from "
                                f"train.weight_decay={tc.weight_decay}, which must be > 0")
        step = 0
        if init_from is not None and not self.resume:
            moved = carry_over(task, optimizer, load_checkpoint(init_from, map_location=self.device))
            if self.is_main and not self.quiet:
                fresh = [k for k in moved["fresh"] if not k.endswith("num_batches_tracked")]
                print(f"starting from {init_from}: {len(moved['carried'])} tensors carried over"
                      + (f", {len(fresh)} new ({', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''})" if fresh else ""))
        state = None
        if self.resume:
            state = self._load(task, optimizer, spe)
            step = state["step"]
        for i, h in enumerate(self.hooks):
            h.before_train(self)
            if state is not None and _hook_key(i, h) in state.get("hooks", {}):
                h.load_state_dict(state["hooks"][_hook_key(i, h)])

        # Resident data: built-in datasets live on the GPU, so augmentation never waits on the CPU.
        resident = None
        if hasattr(data, "images") and self.device.type == "cuda":
            resident = {"images": data.images.to(self.device), "labels": getattr(data, "labels", None)}
            if resident["labels"] is not None:
                resident["labels"] = resident["labels"].to(self.device)
        model = task
        if world > 1 and not self.sharded:     # FSDP reduces the gradients itself
            # gradient_as_bucket_view was tried: with zero_grad(set_to_none=True) each step's gradients
            # are allocated anew, and peak memory did not move (benchmarks/scale.py, 2026-12-06)
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                                        else None)
        if tc.compile:
            model = torch.compile(model)

        self.writer = self._tb_writer(purge_step=step + 1 if self.resume else None) if self.writes else None
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a") if self.writes else None
        max_steps = min(total_steps, tc.max_steps) if tc.max_steps else total_steps
        bar = tqdm(total=max_steps, initial=step, desc=task.name, unit="step", dynamic_ncols=True,
                   disable=not self.is_main or self.quiet, mininterval=1.0)
        bad = torch.zeros((), device=self.device, dtype=torch.bool)
        last_ckpt = step
        sums: dict[str, torch.Tensor] = {}
        count, t_log, img_log = 0, time.perf_counter(), 0
        try:
            while step < max_steps:
                epoch, skip = divmod(step, spe)
                task.train_mode()
                for batch in self.batches(data, epoch, skip, resident):
                    rng = StepRNG(own=torch.Generator().manual_seed(D.seed_for(tc.seed, step, self.dist.rank)),
                                  shared=torch.Generator().manual_seed(D.seed_for(tc.seed, step)))
                    torch.manual_seed(D.seed_for(tc.seed, step, self.dist.rank, 1))
                    if tc.schedule == "step":
                        cur_lr = step_lr(step, total_steps, lr, warmup_steps, tc.milestones)
                    else:
                        cur_lr = cosine_lr(step, total_steps, lr, warmup_steps, tc.min_lr)
                    apply_lr(optimizer, cur_lr)
                    if tc.weight_decay_end is not None:
                        # a function of the step alone, like the lr: a resumed run gets the same values
                        cur_wd = cosine_wd(step, total_steps, tc.weight_decay, tc.weight_decay_end)
                        for g, d in zip(optimizer.param_groups, decays):
                            if d:
                                g["weight_decay"] = cur_wd
                    task.on_step_start(step, spe, total_steps)
                    n_global = batch["global_size"]
                    with torch.no_grad():
                        batch = task.make_batch(batch, rng)
                    with self.autocast():
                        out = model(batch)
                    loss = out["loss"]
                    n_own = len(range(self.dist.rank, n_global, world))   # this process's share
                    if world > 1 and n_own * world != n_global:
                        # Each process's loss is the mean over its share and DDP averages the
                        # gradients: weighted by the share's part of the batch (shares differ by
                        # an image when the batch does not divide), the average is the gradient
                        # of the whole batch's mean loss, as one process computes it.
                        weight = world * n_own / n_global
                        loss = loss * weight
                        out = {k: v * weight if torch.is_tensor(v) else v for k, v in out.items()}
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if tc.clip_grad > 0:
                        nn.utils.clip_grad_norm_(task.parameters(), tc.clip_grad)
                    task.before_optimizer_step(step, spe)
                    optimizer.step()
                    task.on_step_end(step, total_steps)
                    if world > 1:
                        # rank 0's BatchNorm statistics everywhere (gloo has no SyncBatchNorm), so
                        # hooks (EMA, evaluation) see one model before DDP's next forward syncs them
                        D.broadcast_buffers(task)
                    # Checked lazily (no GPU sync per step); nothing is saved before the check.
                    bad |= ~torch.isfinite(loss.detach())
                    for k, v in out.items():
                        v = torch.as_tensor(v, device=self.device).detach().float()
                        sums[k] = sums[k] + v if k in sums else v
                    count += 1
                    img_log += n_global
                    step += 1
                    self.step, self.epoch = step, step // spe
                    for h in self.hooks:
                        h.after_step(self)
                    bar.update(1)
                    end_of_epoch = step % spe == 0
                    want_ckpt = (tc.ckpt_every and step % tc.ckpt_every == 0) or step == max_steps or \
                        (not tc.ckpt_every and end_of_epoch)
                    if step % tc.log_every == 0 or want_ckpt or end_of_epoch:
                        self._check_finite(bad, step, last_ckpt)
                        means = {k: D.all_reduce_mean(v / count).item() for k, v in sums.items()}
                        ips = img_log / max(1e-9, time.perf_counter() - t_log)
                        rec = {"step": step, "epoch": round(step / spe, 4), "loss": means.pop("loss"),
                               "lr": cur_lr, **({"wd": cur_wd} if tc.weight_decay_end is not None else {}),
                               "img_per_s": round(ips, 1), **means}
                        self.history["loss"].append([step, rec["loss"]])
                        self.log(rec, prefix="train")
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{ips:.0f}", lr=f"{cur_lr:.2e}")
                        sums, count, t_log, img_log = {}, 0, time.perf_counter(), 0
                    if end_of_epoch:
                        for h in self.hooks:
                            h.after_epoch(self)
                        task.train_mode()
                    if want_ckpt:
                        self._save(task, optimizer, step)
                        last_ckpt = step
                    if step >= max_steps:
                        break
            for h in self.hooks:   # while the metrics file is open: a final evaluation is logged
                h.after_train(self)
        finally:
            bar.close()
            if self.metrics_file:
                self.metrics_file.close()
            if self.writer:
                self.writer.close()

        if self.sharded:   # the caller's task gets the full weights: export and evaluation as after DDP
            parallel.restore(plain, parallel.full_state_dict(task))
            self.task = task = plain
        result = {"steps": step, "loss": self.history["loss"][-1][1] if self.history["loss"] else float("nan"),
                  "knn": self.history["knn"][-1][1] if self.history["knn"] else None,
                  "skipped": len(self.skipped), "finished": step >= total_steps,
                  "run_dir": str(self.run_dir) if self.run_dir is not None else None}
        if self.writes:
            self._finish(data)
        D.barrier()
        return result

    # ---------------------------------------------------------------- helpers
    def log(self, rec: dict, prefix: str = "train") -> None:
        """One line of metrics.jsonl (rank 0) and its scalars in TensorBoard under ``prefix/``."""
        if self.metrics_file:
            self.metrics_file.write(json.dumps(rec) + "\n")
            self.metrics_file.flush()
        if self.writer:
            for k, v in rec.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, self.step)

    def _check_finite(self, bad: torch.Tensor, step: int, last_ckpt: int) -> None:
        if D.all_reduce_max(bad.to(torch.float32)).item() > 0:
            where = (f"the last good checkpoint (step {last_ckpt}) is kept in {self.run_dir / 'checkpoints'}"
                     if last_ckpt and self.run_dir is not None else "no checkpoint had been written yet")
            raise TrainingError(f"loss became NaN or inf at or before step {step}; {where}. "
                                f"Lower train.lr, set train.clip_grad, or use train.precision=fp32.")

    def _save(self, task: nn.Module, optimizer, step: int) -> None:
        if self.run_dir is None:
            return
        meta = {"step": step, "history": self.history, "config": to_dict(self.cfg),
                "skipped": sorted(self.skipped.items()), "world_size": self.dist.world_size,
                "hooks": {_hook_key(i, h): h.state_dict() for i, h in enumerate(self.hooks)}}
        if self.sharded:   # every process writes its shard
            parallel.save_sharded(self.run_dir / "checkpoints", step, task, optimizer, meta)
        elif self.writes:
            save_checkpoint(self.run_dir / "checkpoints" / "last.pt",
                            {"method": task.state_dict(), "optimizer": optimizer.state_dict(), **meta})

    def _load(self, task: nn.Module, optimizer, spe: int) -> dict:
        if self.run_dir is None:
            raise TrainingError("resuming needs the run directory")
        where = parallel.sharded_checkpoint(self.run_dir / "checkpoints")
        if (where is not None) != self.sharded:
            made = "train.parallel=fsdp (sharded)" if where is not None else "train.parallel=ddp"
            raise TrainingError(f"the checkpoint in '{self.run_dir}' was made with {made}: resume with the same")
        try:
            state = parallel.load_sharded(where, task, optimizer) if self.sharded else \
                load_checkpoint(self.run_dir, map_location=self.device)
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise TrainingError(f"'{where or self.run_dir / 'checkpoints' / 'last.pt'}' is not a readable checkpoint "
                                f"({type(e).__name__}: {first})") from None
        tc = self.cfg.train
        saved_bs = state.get("config", {}).get("train", {}).get("batch_size", tc.batch_size)
        if saved_bs != tc.batch_size:
            raise TrainingError(f"the checkpoint was trained with train.batch_size={saved_bs}; resuming with "
                                f"{tc.batch_size} would not continue the same run")
        if self.strict_resume:
            saved, now = _flat(state.get("config", {})), _flat(to_dict(self.cfg))
            differ = sorted(k for k in set(saved) | set(now) if k not in _RUN_ONLY and saved.get(k) != now.get(k))
            if differ:
                raise TrainingError(f"the checkpoint in '{self.run_dir}' was made with other values of "
                                    f"{', '.join(differ)}: resume with the run's own config.yaml")
        if state.get("world_size", self.dist.world_size) != self.dist.world_size and self.is_main and not self.quiet:
            # the global batches are the same; each process's own random stream (views) is not
            print(f"resuming a run of {state['world_size']} process(es) on {self.dist.world_size}: the data order "
                  "is kept, the augmentations differ from an unbroken run from here on")
        if not self.sharded:
            task.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
        self.history = {"loss": [], "knn": [], "eval": [], **state["history"]}
        # [index, reason] pairs (keel 0.1's checkpoints hold the indices alone)
        self.skipped = {int(k[0]): k[1] for k in state.get("skipped", []) if isinstance(k, (list, tuple))} or \
            {int(k): "cannot decode" for k in state.get("skipped", []) if not isinstance(k, (list, tuple))}
        self.step = state["step"]
        self.epoch = self.step // spe
        self._truncate_metrics(self.step)
        if self.is_main and not self.quiet:
            print(f"resumed from step {self.step} ({self.step / spe:.2f} epochs)")
        return state

    def _check_shared_run_dir(self) -> None:
        """Every node must see rank 0's run directory (keel assumes a shared file system for it)."""
        if self.run_dir is None or self.dist.world_size == 1:
            return
        D.barrier()                                   # rank 0 has written config.yaml
        written = Path(D.broadcast_object(str(self.run_dir / "config.yaml")))
        seen = D.all_gather_cat(torch.tensor([float(written.is_file())], device=self.device)).tolist()
        blind = [r for r, s in enumerate(seen) if not s]
        if blind:
            raise TrainingError(f"process(es) {', '.join(map(str, blind))} cannot see the run directory "
                                f"'{written.parent}' that rank 0 wrote (on {D.broadcast_object(socket.gethostname())}): "
                                "put it on a file system every node mounts")

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.writes or not path.exists():
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

    def _finish(self, data) -> None:
        name_of = getattr(data, "name_of", None) or (data.paths.__getitem__ if getattr(data, "paths", None) is not None else None)
        if self.skipped and name_of is not None:
            (self.run_dir / "skipped.txt").write_text("".join(f"{name_of(i)}\t{why}\n" for i, why in sorted(self.skipped.items())))
        plot_run(self.history, self.run_dir / "curves.png", main_metric=self.task.main_metric)
        if not self.quiet and name_of is not None:
            print(f"{len(self.skipped)} files skipped" + (f" (list in {self.run_dir / 'skipped.txt'})" if self.skipped else ""))


def _hook_key(i: int, hook) -> str:
    """A hook's name in the checkpoint: its place and class (two EvalHooks keep apart)."""
    return f"{i}.{type(hook).__name__}"


_RUN_ONLY = ("data.num_workers", "train.out_dir", "train.run_name")   # keys a resumed run may change


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
