"""Hooks: what a run does around the loop that is not the loop. Any task can use any of them.

A hook's methods get the trainer (its ``task``, ``step``, ``epoch``, ``device``, ``history``,
``log``, ``autocast``, ``is_main``). What a hook keeps across steps is in ``state_dict`` and goes
into every checkpoint, so a resumed run continues the hook exactly.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from tqdm import tqdm

from keel.engine import distributed as D
from keel.engine.parallel import gathered
from keel.evaluate.monitor import knn_monitor


class Hook:
    def before_train(self, trainer) -> None:
        """After the optimizer is built and before the first step (and before its state is restored)."""

    def after_step(self, trainer) -> None:
        """After each optimizer step."""

    def after_epoch(self, trainer) -> None:
        """At the end of every epoch, before its checkpoint is written."""

    def after_train(self, trainer) -> None:
        """Once training stops, on every process."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """One step of a model EMA (timm's ModelEma, DeiT's ``--model-ema``): every floating-point
    entry of the state dict, parameters and buffers (BatchNorm statistics) alike, becomes
    ``decay * ema + (1 - decay) * model``; integer buffers (BatchNorm's step count) are copied.
    Started from a copy of the model before the first step, after k steps it is
    ``decay**k * w0 + (1 - decay) * sum_i decay**(k - i) * w_i``."""
    own = model.state_dict()
    for key, e in ema.state_dict().items():
        if e.is_floating_point():
            e.lerp_(own[key].to(e.dtype), 1.0 - decay)
        else:
            e.copy_(own[key])


class EMAHook(Hook):
    """An exponential moving average of ``module`` (the task's model), updated after every step.
    Every process keeps one (of identical weights, so identical)."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.ema: nn.Module | None = None

    def before_train(self, trainer) -> None:
        self.ema = copy.deepcopy(self.module).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def after_step(self, trainer) -> None:
        update_ema(self.ema, self.module, self.decay)

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])


def better(value: float, best: float | None) -> bool:
    """Higher is better; a NaN (a metric undefined on this epoch's outputs) never is."""
    return not math.isnan(value) and (best is None or math.isnan(best) or value > best)


class EvalHook(Hook):
    """``task.evaluate(data, trainer, model)`` every ``every`` epochs and after the last one (0:
    the last one only). Each evaluation is a line of metrics.jsonl and an entry of
    ``trainer.history["eval"]``; ``best`` is the evaluation with the highest
    ``task.main_metric``, and ``on_best(epoch, metrics)`` is called (on every process) when it
    improves. ``model``: evaluate this module instead of the task's own (an EMA's); its metrics
    are logged with ``prefix``."""

    def __init__(self, data, every: int = 1, model=None, prefix: str = "", on_best=None):
        self.data, self.every, self.model, self.prefix, self.on_best = data, every, model, prefix, on_best
        self.best: dict | None = None
        self.last: dict | None = None
        self.last_step = -1

    def after_epoch(self, trainer) -> None:
        last = trainer.step >= trainer.total_steps
        if last or (self.every and trainer.epoch % self.every == 0):
            self._evaluate(trainer)

    def after_train(self, trainer) -> None:
        # a run stopped early (train.max_steps) is still evaluated where it stopped
        if self.last_step != trainer.step:
            self._evaluate(trainer)

    def _evaluate(self, trainer) -> None:
        spe = trainer.steps_per_epoch_
        epoch = trainer.step // spe if trainer.step % spe == 0 else round(trainer.step / spe, 4)
        model = self.model() if callable(self.model) and not isinstance(self.model, nn.Module) else self.model
        with gathered(trainer.task):
            metrics = {k: float(v) for k, v in trainer.task.evaluate(self.data, trainer, model=model).items()}
        key = trainer.task.main_metric
        self.last, self.last_step = {"epoch": epoch, **metrics}, trainer.step
        if better(metrics[key], self.best[key] if self.best else None):
            self.best = dict(self.last)
            if self.on_best is not None:
                self.on_best(epoch, metrics)
        rec = {"step": trainer.step, "epoch": epoch, **{self.prefix + k: v for k, v in metrics.items()}}
        trainer.history["eval"].append(rec)
        trainer.log(rec, prefix="test")
        if trainer.is_main and not trainer.quiet:
            tqdm.write(f"epoch {epoch:g}: " + ", ".join(f"{self.prefix}{k} {v:.2f}" for k, v in metrics.items()))

    def state_dict(self) -> dict:
        return {"best": self.best, "last": self.last, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.last, self.last_step = state["best"], state["last"], state["last_step"]


class KnnMonitor(Hook):
    """kNN top-1 of the exported backbone every ``every`` epochs, on at most ``subset`` images of
    the labeled splits ``(train, test)``; computed on rank 0 while the others wait."""

    def __init__(self, splits, every: int, img_size: int, k: int, t: float, subset: int, batch_size: int):
        self.splits, self.every, self.img_size = splits, every, img_size
        self.k, self.t, self.subset, self.batch_size = k, t, subset, batch_size

    def sizes(self) -> tuple[int, int]:
        """(images in the bank, test images scored): each split capped at ``subset``."""
        n_train, n_test = (min(len(d), self.subset) if self.subset else len(d) for d in self.splits)
        return n_train, n_test

    def describe(self) -> str:
        n_train, n_test = self.sizes()
        return (f"kNN top-1, k={self.k}, t={self.t:g}: a bank of {n_train} training images, "
                f"scored on {n_test} test images")

    def before_train(self, trainer) -> None:
        trainer.history["knn_about"] = self.describe()     # the curve's title says what was measured
        if trainer.is_main and not trainer.quiet:
            print(f"monitor: {self.describe()}, every {self.every} epoch{'s' if self.every > 1 else ''}")

    def after_epoch(self, trainer) -> None:
        if not self.every or trainer.epoch % self.every:
            return
        # a sharded model runs forward only with every process taking part: each computes it
        if trainer.is_main or trainer.sharded:
            with gathered(trainer.task):
                acc = knn_monitor(trainer.task.export_backbone(), self.splits, self.img_size, self.k, self.t,
                                  self.subset, self.batch_size, trainer.device, trainer.amp_dtype)
        if trainer.is_main:
            trainer.history["knn"].append([trainer.epoch, acc])
            bank = self.sizes()[0]
            trainer.log({"step": trainer.step, "epoch": trainer.epoch, "knn_top1": acc, "knn_k": self.k,
                         "knn_bank": bank}, prefix="monitor")
            if not trainer.quiet:
                tqdm.write(f"epoch {trainer.epoch}: kNN top-1 {acc:.2f}% (k={self.k}, bank of {bank})")
        D.barrier()
