"""Fine-tuning, from a config to a finished run: labeled data, backbone, objective and teacher
meet here, and the one trainer runs them (:class:`keel.tasks.classify.SupervisedTask`).

* ``finetune(backbone, train, test, cfg)``: fine-tune a module in memory (the suite, few-shot and
  the lr search call it); ``run_finetune(cfg, run_dir)``: everything from a config, as ``keel
  finetune`` does, with the recipes (:mod:`keel.recipes`) and the lr search first.
* Evaluation on the test split every ``train.eval_every`` epochs and after the last one (a hook);
  "best" in result.json is the best evaluation by the objective's main metric, picked on the test
  split itself (optimistic); "final", the last epoch, is the honest one without a validation split.
* Several processes: ``torchrun --nproc_per_node N -m keel finetune ...``. ``train.batch_size`` is
  the global batch; every process takes its share, views are drawn for the whole batch (with plain
  crop + flip, N processes make exactly one process's views), losses are weighted by the shares.
* Resume (``--resume RUN_DIR``): from the last checkpoint (every epoch's end, or every
  ``train.ckpt_every`` steps), exactly: the same weights, metrics and files as an unbroken run.

Artifacts in the run directory: config.yaml (the values used), metrics.jsonl, checkpoints/last.pt,
classifier.safetensors (backbone + head, keys ``backbone.*``, ``head.*``), classifier_best.safetensors,
classifier_ema.safetensors (with ``train.model_ema``), result.json, curves.png, tb/.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from keel import hub
from keel.config import ConfigError, FinetuneConfig, load_config, override, to_dict
from keel.data.labels import LabeledCSV
from keel.data.recipes import parse_randaugment
from keel.data.sources import DataError, ImageFolder, check_crop_from, is_shards, labeled_splits
from keel.engine import distributed as D
from keel.engine.checkpoint import has_checkpoint, save_weights, write_json
from keel.engine.hooks import EMAHook, EvalHook
from keel.engine.trainer import Trainer
from keel.evaluate.multilabel import MultiLabelTask, TwoLevelTask
from keel.recipes.lr_search import SEARCH_DIR, search_config_path, search_lr
from keel.recipes.supervised import NAMES, apply_recipe, bit_recipe, resolve_defaults
from keel.tasks.classify import MODES, ClassificationTask, SupervisedTask
from keel.tasks.distill import DISTILL_KINDS

_CHECKPOINT = Path("checkpoints") / "last.pt"


def check(cfg: FinetuneConfig) -> None:
    """One-line errors for values no run could use, before anything is built."""
    t, a, tr, d, r = cfg.task, cfg.aug, cfg.train, cfg.distill, cfg.recipe
    choices = {"task.mode": (t.mode, MODES), "train.optimizer": (tr.optimizer, ("adamw", "sgd", "lars")),
               "train.schedule": (tr.schedule, ("cosine", "step")),
               "train.precision": (tr.precision, ("auto", "bf16", "fp32")),
               "recipe.name": (r.name, NAMES), "task.multilabel_loss": (t.multilabel_loss, ("bce", "asl")),
               "distill.kind": (d.kind, DISTILL_KINDS)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {' | '.join(a or repr(a) for a in allowed)}, got {value!r}")
    if tr.epochs < 1 or tr.batch_size < 1:
        raise ConfigError("train.epochs and train.batch_size must be >= 1")
    if t.partial_blocks < 0 or tr.eval_every < 0 or tr.warmup_epochs < 0:
        raise ConfigError("task.partial_blocks, train.eval_every and train.warmup_epochs must be >= 0")
    if not 0.0 < tr.layer_decay <= 1.0:
        raise ConfigError(f"train.layer_decay must be in (0, 1], got {tr.layer_decay}")
    if any(not 0.0 <= m <= 1.0 for m in tr.milestones):
        raise ConfigError(f"train.milestones are fractions of training in [0, 1], got {tr.milestones}")
    if cfg.data.exclude:
        raise ConfigError("data.exclude is for pretraining folders; keel finetune trains on every labeled image: "
                          "leave the files out of the labeled folder or CSV instead")
    if cfg.data.test_source and not str(cfg.data.source).lower().endswith(".csv"):
        raise ConfigError("data.test_source is for a CSV source: folders and built-ins carry their own test split")
    if not 0.0 < t.threshold < 1.0:
        raise ConfigError(f"task.threshold is a probability in (0, 1), got {t.threshold}")
    if a.randaugment:
        try:
            parse_randaugment(a.randaugment)
        except ValueError as e:
            raise ConfigError(f"aug.randaugment: {e}") from None
    if a.mixup < 0 or a.cutmix < 0:
        raise ConfigError("aug.mixup and aug.cutmix are Beta alphas: >= 0 (0 = off)")
    for key, value in {"aug.mix_switch_prob": a.mix_switch_prob, "aug.reprob": a.reprob, "aug.hflip": a.hflip,
                       "distill.alpha": d.alpha}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    if not 0.0 < a.scale_min <= 1.0:
        raise ConfigError(f"aug.scale_min is a fraction of the image area in (0, 1], got {a.scale_min}")
    if not 0.0 <= tr.model_ema < 1.0:
        raise ConfigError(f"train.model_ema is a decay in [0, 1) (0 = off), got {tr.model_ema}")
    if d.tau <= 0:
        raise ConfigError(f"distill.tau must be > 0, got {d.tau}")
    if not 1 <= tr.repeated_aug <= tr.batch_size:
        raise ConfigError(f"train.repeated_aug must be between 1 and train.batch_size, got {tr.repeated_aug}")
    if d.teacher and d.kind == "none":
        raise ConfigError("distill.teacher is set but distill.kind=none: choose distill.kind=hard or soft")
    if r.lr_search and tr.lr is not None:
        raise ConfigError("set train.lr or recipe.lr_search, not both (the search chooses the lr)")
    if any(not v > 0 for v in r.lr_search):
        raise ConfigError(f"recipe.lr_search lists learning rates > 0, got {r.lr_search}")
    if not 0.0 < r.lr_search_holdout < 1.0:
        raise ConfigError(f"recipe.lr_search_holdout is a fraction in (0, 1), got {r.lr_search_holdout}")


def num_classes(train_ds, test_ds) -> int:
    labels = [torch.as_tensor(d.labels) for d in (train_ds, test_ds)]
    if any(int(y.min()) < 0 for y in labels if y.numel()):
        raise DataError("the dataset has unlabeled images (label -1): fine-tuning needs a labeled dataset")
    top = max(int(y.max()) + 1 for y in labels if y.numel())
    return max(top, len(getattr(train_ds, "classes", None) or []))


def finetune(backbone: nn.Module, train_ds, test_ds, cfg: FinetuneConfig, task=None,
             run_dir: str | Path | None = None, progress: bool = True, teacher: nn.Module | None = None,
             resume: bool = False) -> dict:
    """Fine-tune ``backbone`` (in place, like MAE) with the head of ``task`` (an objective; default:
    classification over the datasets' labels) and return ``{"best": {"epoch", **metrics}, "final":
    {...}, "main_metric", ...}`` plus ``"classifier"``, the trained classifier (left out of
    result.json), and with ``train.model_ema`` ``"best_ema"`` and ``"ema_classifier"``. Afterwards
    every parameter's ``requires_grad`` is as it was. With ``cfg.distill.kind`` the teacher is
    ``teacher`` or else loaded from ``cfg.distill.teacher``. ``resume``: continue from
    ``run_dir``'s last checkpoint (same backbone architecture, data, config and processes)."""
    cfg = resolve_defaults(apply_recipe(cfg, verbose=progress and D.rank() == 0))
    check(cfg)
    if cfg.recipe.lr_search:
        raise ConfigError("recipe.lr_search is run_finetune's (or keel.recipes.lr_search.search_lr's): "
                          "finetune() trains one lr")
    if resume and run_dir is None:
        raise ConfigError("resume=True needs the run_dir to resume")
    t0 = time.perf_counter()
    objective = task if task is not None else ClassificationTask(num_classes(train_ds, test_ds),
                                                                 cfg.task.label_smoothing)
    d = cfg.distill
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0 or d.kind != "none") and not isinstance(objective, ClassificationTask):
        raise ConfigError("aug.mixup, aug.cutmix and distillation need a single-label classification task")
    if d.kind == "none" and teacher is not None:
        raise ConfigError("a teacher was given but distill.kind=none: choose distill.kind=hard or soft")
    if d.kind != "none" and teacher is None:
        if not d.teacher:
            raise ConfigError(f"distill.kind={d.kind} needs a teacher: set distill.teacher=<finetune run | "
                              "timm:<model>:<file> | random:<model>>")
        teacher = hub.resolve_classifier(d.teacher, objective.num_classes, cfg.data.img_size, seed=cfg.train.seed)
    trainer = Trainer(cfg, run_dir, resume=resume, quiet=not progress, strict_resume=True)
    if trainer.dist.world_size > 1 and len(test_ds) < trainer.dist.world_size:
        raise ConfigError(f"{len(test_ds)} test images cannot be shared by {trainer.dist.world_size} processes")

    was_trainable = [(p, p.requires_grad) for p in backbone.parameters()]
    torch.manual_seed(cfg.train.seed)                       # the head's initialisation
    st = SupervisedTask(backbone, objective, cfg, teacher)
    writes = trainer.writes

    def save_best(epoch: int, metrics: dict) -> None:
        if writes:
            save_weights(st.model, Path(run_dir) / "classifier_best.safetensors",
                            {"epoch": epoch, st.main_metric: metrics[st.main_metric]})

    main = EvalHook(test_ds, cfg.train.eval_every, on_best=save_best)
    hooks = [main]
    ema = None
    if cfg.train.model_ema > 0:
        ema = EMAHook(st.model, cfg.train.model_ema)
        hooks += [ema, EvalHook(test_ds, cfg.train.eval_every, model=lambda: ema.ema, prefix="ema_")]
    teacher_metrics = None
    if teacher is not None:   # how good the teacher is on this test split: said and recorded
        teacher_metrics = st.objective.metrics(*st.predict(test_ds, trainer.device, trainer.autocast,
                                                           teacher.to(trainer.device)))
    if progress and trainer.is_main:
        _header(cfg, backbone, train_ds, test_ds, objective, trainer, teacher, teacher_metrics)
    try:
        res = trainer.fit(st, train_ds, hooks)
    finally:
        for p, flag in was_trainable:
            p.requires_grad_(flag)
    st.model.eval()                     # handed back ready to predict
    final = {**main.last, **({f"ema_{k}": v for k, v in hooks[2].last.items() if k != "epoch"} if ema else {})}
    result = {
        "main_metric": st.main_metric, "best": main.best, "final": final, "mode": cfg.task.mode,
        "epochs": cfg.train.epochs, "steps": res["steps"], "train_images": len(train_ds), "test_images": len(test_ds),
        "trainable_params": sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]),
        "seconds": round(time.perf_counter() - t0, 2), "lr": cfg.train.lr, "img_size": cfg.data.img_size,
    }
    if cfg.recipe.name:
        result["recipe"] = cfg.recipe.name
    if teacher is not None:
        result["distill"] = {"kind": d.kind, "teacher": d.teacher or "(a module)",
                             **{f"teacher_{k}": float(v) for k, v in teacher_metrics.items()}}
    if ema is not None:
        result["best_ema"] = hooks[2].best
    if writes:
        run_dir = Path(run_dir)
        save_weights(st.model, run_dir / "classifier.safetensors", {"epoch": main.last["epoch"]})
        if ema is not None:
            save_weights(ema.ema, run_dir / "classifier_ema.safetensors",
                            {"epoch": main.last["epoch"], "model_ema": cfg.train.model_ema})
        write_json(run_dir / "result.json", result)
    D.barrier()                         # torchrun: rank 0's files exist when any rank returns
    out = dict(result, classifier=st.model)
    if ema is not None:
        out["ema_classifier"] = ema.ema
    return out


def _header(cfg, backbone, train_ds, test_ds, objective, trainer, teacher, teacher_metrics) -> None:
    n_params = sum(p.numel() for p in backbone.parameters()) / 1e6
    classes = getattr(objective, "num_classes", "?")
    print(f"finetune ({cfg.task.mode}) · {cfg.model.backbone or type(backbone).__name__} ({n_params:.1f}M) · "
          f"{cfg.data.source}: {len(train_ds)} train / {len(test_ds)} test images, {classes} classes · "
          f"{cfg.data.img_size} px · lr {cfg.train.lr:g} per 256 · batch {cfg.train.batch_size} · "
          f"{cfg.train.epochs} epochs · {trainer.device} × {trainer.dist.world_size}"
          + (f" → {trainer.run_dir}" if trainer.run_dir is not None else ""))
    if teacher is not None:
        key = objective.main_metric
        print(f"distilling ({cfg.distill.kind}, alpha {cfg.distill.alpha:g}) from "
              f"{cfg.distill.teacher or type(teacher).__name__}: {key} {teacher_metrics[key]:.2f} on the test split")


def default_run_dir(cfg: FinetuneConfig) -> Path:
    spec = cfg.model.backbone.rstrip("/")
    what = spec.split(":")[1] if spec.startswith(("timm:", "random:")) else Path(spec).name
    src = cfg.data.source
    data = Path(src).stem if str(src).lower().endswith(".csv") else Path(src).name
    return Path(cfg.train.out_dir) / "-".join(["finetune", cfg.task.mode, what or "backbone", data or "data",
                                               time.strftime("%Y%m%d-%H%M%S")])


def labeled_data(cfg: FinetuneConfig):
    """``(train, test, objective)`` for ``cfg.data.source`` at ``cfg.data.img_size``. A ``.csv``
    file's header picks the objective: ``image,labels`` multi-label, ``image,primary,secondary``
    two-level; its test split is ``data.test_source`` or every 5th row. Anything else is
    single-label classification (objective None: :func:`finetune` builds it from the labels)."""
    src, size = cfg.data.source, cfg.data.img_size
    if is_shards(src):
        raise DataError("fine-tuning reads image folders, label CSVs and built-ins; shards (data.source=shards:...) "
                        "are for keel pretrain")
    check_crop_from(cfg.data.crop_from)
    if not str(src).lower().endswith(".csv"):
        train, test = labeled_splits(src, size)
        if isinstance(train, ImageFolder):     # training crops over the whole image; the test split stays centred
            train.whole = cfg.data.crop_from == "whole"
        return train, test, None
    train = LabeledCSV(src, size)
    if train.kind == "multilabel":
        classes = dict(classes=train.classes)
    else:
        classes = dict(primary_classes=train.primary_classes, secondary_classes=train.secondary_classes)
    if cfg.data.test_source:
        try:
            test = LabeledCSV(cfg.data.test_source, size, **classes)
        except ValueError as e:      # the class lists of one kind given to a file of the other
            raise DataError(f"data.test_source and data.source are different kinds of label file ('{src}' "
                            f"is {train.kind}): {e}") from None
    else:
        ids = torch.arange(len(train))
        train, test = train.subset(ids[ids % 5 != 0]), train.subset(ids[ids % 5 == 0])
        if len(test) == 0:
            raise DataError(f"'{src}' has too few rows to hold out a test split (every 5th row): "
                            "give data.test_source=<test csv>")
    if train.kind == "multilabel":
        objective = MultiLabelTask(len(train.classes), loss=cfg.task.multilabel_loss, threshold=cfg.task.threshold,
                                   class_names=train.classes)
    else:
        objective = TwoLevelTask(len(train.primary_classes), len(train.secondary_classes),
                                 hierarchy=train.hierarchy_ids)
    return train, test, objective


def run_finetune(cfg: FinetuneConfig | None, run_dir: str | Path | None = None, progress: bool = True,
                 resume: bool = False) -> dict:
    """Everything from a config: the recipe, the labeled data, the lr search when asked, the
    backbone (:func:`keel.hub.resolve_backbone`), then :func:`finetune` into ``run_dir`` (default:
    a new folder under ``train.out_dir``). ``resume``: continue the run in ``run_dir`` with its own
    config.yaml (``cfg`` None, or the same config); a finished run returns its result."""
    if resume:
        if run_dir is None:
            raise ConfigError("resume needs the run directory")
        run_dir = Path(run_dir)
        searched = search_config_path(run_dir)
        if not has_checkpoint(run_dir) and searched.is_file():
            saved = load_config(searched, cls=FinetuneConfig)
        elif not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"'{run_dir}' is not a finetune run directory (no config.yaml in it)")
        elif not has_checkpoint(run_dir):
            raise FileNotFoundError(f"nothing to resume: no checkpoint at '{run_dir / _CHECKPOINT}' (the run ended "
                                    "before its first checkpoint; start it again)")
        else:
            saved = load_config(run_dir / "config.yaml", cls=FinetuneConfig)
        if cfg is not None and to_dict(saved) not in (to_dict(cfg), to_dict(_prepared(cfg))):
            raise ConfigError(f"resuming '{run_dir}' uses its own config.yaml: pass no other config")
        cfg = saved
    elif cfg is None:
        raise ConfigError("no config given (cfg=None is for resume=True)")
    if not cfg.model.backbone:
        raise ConfigError("model.backbone is not set: a run directory, timm:<model>:<file> or random:<model>")
    check(cfg)
    from keel.jobs.clip import is_clip_run
    from keel.jobs.fusion import run_fusion
    if is_clip_run(cfg.model.backbone):          # image + text data: heads on both towers' embeddings
        if resume:
            raise ConfigError("a fusion run trains heads on frozen embeddings in minutes: run it again, no --resume")
        return run_fusion(cfg, run_dir if run_dir is not None else default_run_dir(cfg))
    created = D.world_size() == 1          # no group yet: torchrun's is made here
    progress = progress and D.init_distributed(cfg.train.device).rank == 0
    try:
        return _run(cfg, run_dir, progress, resume)
    finally:
        if created and D.world_size() > 1:      # leave the group this call joined
            dist.destroy_process_group()


def _prepared(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` as a run saves it: the recipe applied, defaults and the image size resolved."""
    cfg = resolve_defaults(apply_recipe(cfg, verbose=False))
    if cfg.data.img_size <= 0 and cfg.model.backbone:
        cfg = override(cfg, {"data.img_size": hub.default_img_size(cfg.model.backbone)})
    return cfg


def _run(cfg: FinetuneConfig, run_dir, progress: bool, resume: bool) -> dict:
    size_given = cfg.data.img_size > 0
    if not size_given:
        cfg = override(cfg, {"data.img_size": hub.default_img_size(cfg.model.backbone)})
    train_ds, test_ds, objective = labeled_data(cfg)
    if cfg.recipe.name == "bit":
        size = cfg.data.img_size
        cfg = bit_recipe(cfg, train_ds, progress, size_given=size_given)
        if objective is not None and cfg.aug.mixup > 0:
            if progress:
                print(f"  mixup {cfg.aug.mixup:g} left out: MixUp is for single-label classification")
            cfg = override(cfg, {"aug.mixup": 0.0})
        if cfg.data.img_size != size:                                # decoded again at HyperRule's resolution
            train_ds, test_ds, objective = labeled_data(cfg)
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)

    def fit(c, train, test, obj, out_dir, resume_it):
        backbone, _ = hub.resolve_backbone(c.model.backbone, c.data.img_size, seed=c.train.seed)
        return finetune(backbone, train, test, c, task=obj, run_dir=out_dir, progress=progress, resume=resume_it)

    if cfg.recipe.lr_search:
        cfg, _ = search_lr(cfg, train_ds, objective, run_dir, fit, progress, resume)
    result = fit(cfg, train_ds, test_ds, objective, run_dir, resume and has_checkpoint(run_dir))
    if (run_dir / SEARCH_DIR / "scores.json").is_file():
        result["lr_search"] = json.loads((run_dir / SEARCH_DIR / "scores.json").read_text())
    return result
