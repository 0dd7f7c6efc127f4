"""One command, every transfer protocol: several checkpoints side by side on several datasets.

For each dataset and each checkpoint, in this order:

1. ``knn`` / ``linear``: :func:`keel.evaluate.frozen.evaluate_frozen` (kNN with k = 20 and 200,
   linear probe), on features extracted once and cached for the steps below;
2. ``fewshot``: :func:`keel.evaluate.fewshot.fewshot` (kNN and linear probe on ``shots`` images per
   class, ``draws`` random draws) on the same cached features; shot counts larger than the
   smallest class are left out (and said so in the notes);
3. ``finetune``: :func:`keel.jobs.finetune.finetune` of a copy of the backbone, a short
   schedule by default (:func:`suite_finetune_config`) or BiT-HyperRule (``finetune_recipe=
   "hyperrule"``, see :mod:`keel.recipes.hyperrule`); the last epoch's top-1 is reported;
4. ``robustness``: top-1 on the test split shifted by noise, blur, contrast and JPEG at one
   severity (:mod:`keel.evaluate.robustness`), scored by the fine-tuned classifier when step 3
   ran, else by kNN (k = 20) against the clean training features;
5. ``label_fractions`` (only when some are given): for each fraction f, a class-balanced subset
   of the training split (:func:`sample_fraction`: round(f x n_c) images of each class c, at
   least one; the same images for every checkpoint) scored by the linear probe on the cached
   features and, when ``finetune`` is among the protocols, by the fine-tune protocol on those
   images alone. The test split is always the whole one.

The numbers are exactly what the protocols return when called directly with the same arguments.
``report.json`` holds everything (config, results, timings) and is rewritten after each
(dataset, checkpoint) pair, so a long run that stops keeps what it finished;
:func:`keel.evaluate.report.write_report` then draws ``report.md`` and the PNGs from it.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from keel import hub
from keel.files import atomic_write_text
from keel.config import FinetuneConfig, override
from keel.data.sources import labeled_splits
from keel.engine.distributed import resolve_device
from keel.evaluate.features import cached_features
from keel.evaluate.fewshot import _draw_seed, fewshot
from keel.evaluate.frozen import evaluate_frozen, make_eval_transform
from keel.evaluate.linear import linear_probe
from keel.evaluate.report import write_report
from keel.evaluate.robustness import SHIFTS, robustness, robustness_knn
from keel.jobs.finetune import finetune
from keel.recipes.hyperrule import hyperrule_config
from keel.version import __version__

__all__ = ["run_suite", "suite_finetune_config", "sample_fraction", "checkpoint_label", "default_img_size",
           "PROTOCOLS"]

PROTOCOLS = ("knn", "linear", "fewshot", "finetune", "robustness")


def suite_finetune_config(img_size: int, epochs: int = 10, device: str = "auto", seed: int = 0,
                          **overrides) -> FinetuneConfig:
    """The suite's short fine-tuning schedule: ``epochs`` epochs of full fine-tuning with AdamW at
    keel's defaults, one epoch of warm-up (at most a tenth of the run), evaluated once at the end.
    ``overrides``: ``{"section.key": value}``."""
    cfg = override(FinetuneConfig(), {"data.img_size": img_size, "train.epochs": epochs,
                                      "train.warmup_epochs": min(1.0, epochs / 10), "train.eval_every": 0,
                                      "train.device": device, "train.seed": seed})
    return override(cfg, overrides) if overrides else cfg


def sample_fraction(labels, fraction: float, seed: int = 0) -> torch.Tensor:
    """The indices (sorted int64) of a class-balanced ``fraction`` of the labeled images:
    ``max(1, round(fraction * n_c))`` images of every class ``c`` present (Python's ``round``,
    halves to even), ``n_c`` being its number of images; -1 (unlabeled) is never taken.
    ``fraction`` 1.0 gives every labeled image.

    Each class is shuffled in one order fixed by ``seed`` whatever the fraction, so a smaller
    fraction is part of a larger one. The shuffle is :func:`keel.evaluate.fewshot.sample_shots`'s
    first draw: where every class has the same size, ``sample_fraction(y, f, s)`` is
    ``sample_shots(y, round(f * n_c), 1, s)[0]``."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"a label fraction must lie in (0, 1], got {fraction:g} (0.01 is 1% of the labels)")
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    classes = sorted(set(labels[labels >= 0].tolist()))
    if not classes:
        raise ValueError("no labeled images to sample from")
    gen = torch.Generator().manual_seed(_draw_seed(seed, 0))
    picks = []
    for c in classes:
        ix = (labels == c).nonzero().flatten()
        picks.append(ix[torch.randperm(len(ix), generator=gen)[:max(1, round(fraction * len(ix)))]])
    return torch.cat(picks).sort().values


def checkpoint_label(spec: str) -> str:
    """A short column name: ``random:MODEL`` and ``timm:MODEL`` as they are, a run by its folder."""
    if spec.startswith("random:"):
        return spec
    if spec.startswith("timm:"):
        return ":".join(spec.split(":", 2)[:2])
    p = Path(spec.rstrip("/"))
    return (p.parent.name if p.suffix in (".safetensors", ".json") else p.name) or spec


def default_img_size(spec: str) -> int:
    """The side a checkpoint is evaluated at when none is given: :func:`keel.hub.default_img_size`."""
    return hub.default_img_size(spec, arg="--checkpoint")


def _unique(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def _dataset_key(source: str) -> str:
    name = source if not os.path.exists(os.path.expanduser(source)) else \
        (os.path.basename(os.path.abspath(os.path.expanduser(source))) or source)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (torch.Tensor,)):
        return obj.tolist()
    return obj


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[suite] {msg}", flush=True)


def run_suite(checkpoints: Sequence[str], datasets: Sequence[str], out_dir: str | Path,
              shots: Sequence[int] = (1, 5, 10, 25), draws: int = 3, finetune_epochs: int = 10,
              img_size: int | None = None, protocols: Sequence[str] = PROTOCOLS, device: str = "auto",
              progress: bool = True, seed: int = 0, knn_ks: Sequence[int] = (20, 200), knn_t: float = 0.1,
              linear_epochs: int = 100, fewshot_protocols: Sequence[str] = ("knn", "linear"),
              finetune_recipe: str = "short", finetune_cfg: FinetuneConfig | None = None,
              hyperrule_scale: float = 1.0, severity: int = 3, shifts: Sequence[str] = SHIFTS,
              batch_size: int = 256, label_fractions: Sequence[float] = ()) -> dict:
    """Evaluate every checkpoint (anything :func:`keel.hub.resolve_backbone` accepts: run directories,
    ``backbone.safetensors``, ``timm:MODEL:FILE``, ``random:MODEL``) on every dataset (built-in
    names or labeled folders, see :func:`keel.data.sources.labeled_splits`) and write
    ``report.json``, ``report.md`` and PNGs into ``out_dir``. Returns the report dict.

    ``img_size`` None: each checkpoint at the side it was pretrained at (:func:`default_img_size`).
    Fine-tuning: ``finetune_cfg`` if given (its img_size, device and seed are set per run), else
    ``finetune_recipe`` "short" (:func:`suite_finetune_config` with ``finetune_epochs``) or
    "hyperrule" (BiT-HyperRule's schedule and optimizer with its steps times ``hyperrule_scale``,
    at the suite's resolution). ``fewshot_protocols`` may add "finetune" (slow: one run per draw).

    ``label_fractions`` (e.g. ``(0.01, 0.1, 1.0)``, each in (0, 1]): the linear probe, and the
    fine-tuning when "finetune" is in ``protocols``, trained on that fraction of the training
    labels (:func:`sample_fraction` with ``seed``), as ``results[dataset][checkpoint]
    ["label_fractions"][str(f)] = {"n_train", "linear", "finetune", "finetune_steps"}``. The
    probe is the ``linear`` protocol's (``linear_epochs``, its seed 0) on the subset's cached
    features; the fine-tuning is the suite's (same recipe and seed; HyperRule sizes its schedule by
    the subset). A fraction that takes the whole split reuses the suite's fine-tune number instead
    of running it again.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown} ({' | '.join(PROTOCOLS)})")
    if finetune_recipe not in ("short", "hyperrule"):
        raise ValueError(f"finetune_recipe must be short | hyperrule, got {finetune_recipe!r}")
    if not checkpoints or not datasets:
        raise ValueError("give at least one checkpoint and one dataset")
    if finetune_epochs < 1 or draws < 1 or not 1 <= severity <= 5:
        raise ValueError("finetune_epochs and draws must be >= 1, severity in 1..5")
    bad = [f for f in label_fractions if not 0.0 < float(f) <= 1.0]
    if bad:
        raise ValueError(f"label fractions must lie in (0, 1], got {', '.join(f'{float(f):g}' for f in bad)} "
                         "(0.01 is 1% of the labels, 1 all of them)")
    fractions = sorted({float(f) for f in label_fractions})
    dev = resolve_device(device)
    amp_dtype = torch.bfloat16 if dev.type == "cuda" else None

    # everything that can fail on a typo fails here, before any long work (or any file written)
    sizes = {spec: int(img_size or default_img_size(spec)) for spec in checkpoints}
    labels = _unique([checkpoint_label(s) for s in checkpoints])
    ds_keys = _unique([_dataset_key(d) for d in datasets])
    splits: dict[tuple[str, int], tuple] = {}

    def get_splits(source: str, size: int):
        if (source, size) not in splits:
            splits[source, size] = labeled_splits(source, size)
        return splits[source, size]

    for source in datasets:
        get_splits(source, sizes[checkpoints[0]])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = dict(checkpoints=[{"label": lb, "spec": s, "img_size": sizes[s]} for lb, s in zip(labels, checkpoints)],
                  datasets=[{"key": k, "source": d} for k, d in zip(ds_keys, datasets)],
                  protocols=list(protocols), shots=list(shots), draws=draws, seed=seed, knn_ks=list(knn_ks),
                  knn_t=knn_t, linear_epochs=linear_epochs, fewshot_protocols=list(fewshot_protocols),
                  finetune_recipe="config" if finetune_cfg is not None else finetune_recipe,
                  finetune_epochs=finetune_epochs, hyperrule_scale=hyperrule_scale, severity=severity,
                  shifts=list(shifts), device=str(dev), batch_size=batch_size)
    if fractions:       # absent otherwise: a suite without fractions writes what it always wrote
        config["label_fractions"] = fractions
    report: dict = {"keel_version": __version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "config": config, "datasets": {}, "results": {}, "notes": [], "seconds": None}
    t_start = time.perf_counter()
    transform_kw = dict(batch_size=batch_size, device=dev, amp_dtype=amp_dtype)

    for key, source in zip(ds_keys, datasets):
        report["results"][key] = {}
        for label, spec in zip(labels, checkpoints):
            size = sizes[spec]
            train, test = get_splits(source, size)
            ytr, yte = torch.as_tensor(train.labels), torch.as_tensor(test.labels)
            # as fewshot counts them: every class up to the largest label of either split
            num_classes = max(int(ytr.max()), int(yte.max())) + 1
            counts = torch.bincount(ytr[ytr >= 0], minlength=num_classes)
            report["datasets"].setdefault(key, {"source": source, "train_images": len(train),
                                                "test_images": len(test), "classes": num_classes,
                                                "smallest_class": int(counts.min()),
                                                "img_size": {}})
            report["datasets"][key]["img_size"][label] = size
            res: dict = {"spec": spec, "img_size": size, "seconds": {}}
            report["results"][key][label] = res
            t0 = time.perf_counter()
            backbone = hub.resolve_backbone(spec, size, seed=seed, arg="--checkpoint")[0].to(dev)
            res["seconds"]["load"] = round(time.perf_counter() - t0, 2)
            _log(progress, f"{key} / {label}: {len(train)} train, {len(test)} test images at {size} px")

            with tempfile.TemporaryDirectory(prefix="keel-suite-") as cache_dir:
                # one feature extraction per split: evaluate_frozen writes the cache, the rest read it
                frozen = [p for p in ("knn", "linear") if p in protocols]
                need_features = frozen or "fewshot" in protocols or \
                    ("robustness" in protocols and "finetune" not in protocols)
                if need_features:
                    t0 = time.perf_counter()
                    out = evaluate_frozen(backbone, train, test, size, dev, protocols=tuple(frozen), ks=tuple(knn_ks),
                                          temperature=knn_t, linear_epochs=linear_epochs, batch_size=batch_size,
                                          cache_dir=cache_dir, amp_dtype=amp_dtype, progress=progress)
                    if "knn" in protocols:
                        res["knn"] = {k: v for k, v in out.items() if k.startswith("knn_")}
                    if "linear" in protocols:
                        res["linear"] = {k: v for k, v in out.items() if k.startswith("linear_")}
                    res["seconds"]["frozen"] = round(time.perf_counter() - t0, 2)
                    _log(progress, "  frozen: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items() if "top1" in k))

                if "fewshot" in protocols:
                    t0 = time.perf_counter()
                    smallest = report["datasets"][key]["smallest_class"]
                    usable = [s for s in shots if s <= smallest]
                    skipped = [s for s in shots if s > smallest]
                    if skipped:
                        note = (f"{key}: {skipped}-shot left out, the smallest training class has "
                                f"{smallest} images")
                        if note not in report["notes"]:
                            report["notes"].append(note)
                    fs_cfg = None
                    if "finetune" in fewshot_protocols:
                        fs_cfg = _finetune_cfg(finetune_cfg, finetune_recipe, size, finetune_epochs, dev, seed,
                                               len(train), hyperrule_scale)[0]
                    res["fewshot"] = fewshot(backbone, train, test, shots=usable, draws=draws,
                                             protocols=tuple(fewshot_protocols), img_size=size, seed=seed,
                                             knn_k=min(knn_ks), knn_t=knn_t, linear_epochs=linear_epochs,
                                             finetune_cfg=fs_cfg, device=str(dev), batch_size=batch_size,
                                             cache_dir=cache_dir, progress=progress) if usable else {}
                    res["seconds"]["fewshot"] = round(time.perf_counter() - t0, 2)

                classifier = None
                if "finetune" in protocols:
                    t0 = time.perf_counter()
                    fcfg, why = _finetune_cfg(finetune_cfg, finetune_recipe, size, finetune_epochs, dev, seed,
                                              len(train), hyperrule_scale)
                    if why:
                        _log(progress, why)
                    out = finetune(copy.deepcopy(backbone), train, test, fcfg, progress=progress)
                    classifier = out.pop("classifier")
                    res["finetune"] = dict(out, recipe=config["finetune_recipe"], explanation=why,
                                           config=dataclasses.asdict(fcfg))
                    res["seconds"]["finetune"] = round(time.perf_counter() - t0, 2)
                    _log(progress, f"  fine-tune: top1 {out['final'][out['main_metric']]:.2f} "
                                   f"({out['steps']} steps)")

                if "robustness" in protocols:
                    t0 = time.perf_counter()
                    if classifier is not None:
                        rob = robustness(classifier, test, size, shifts=shifts, severities=(severity,), seed=seed,
                                         batch_size=batch_size, device=dev, amp_dtype=amp_dtype)
                        scorer = "finetune"
                    else:
                        k = min(knn_ks)
                        train_features = cached_features(backbone, train, make_eval_transform(size),
                                                         Path(cache_dir) / "features_train.safetensors", **transform_kw)
                        rob = robustness_knn(backbone, test, size, train_features, shifts=shifts,
                                             severities=(severity,), k=k, temperature=knn_t, seed=seed,
                                             batch_size=batch_size, device=dev, amp_dtype=amp_dtype)
                        scorer = f"knn@{k}"
                    res["robustness"] = dict(rob, scorer=scorer, severity=severity)
                    res["seconds"]["robustness"] = round(time.perf_counter() - t0, 2)
                    _log(progress, f"  robustness ({scorer}): clean {rob['clean']:.2f}, "
                                   f"mean shifted {rob['mean_shifted']:.2f}")

                if fractions:
                    t0 = time.perf_counter()
                    classifier = None       # fine-tunes below need the memory more
                    res["label_fractions"] = _label_fractions(
                        backbone, train, test, fractions, size, num_classes, Path(cache_dir), res, protocols,
                        dict(finetune_cfg=finetune_cfg, recipe=finetune_recipe, epochs=finetune_epochs, dev=dev,
                             seed=seed, scale=hyperrule_scale),
                        linear_epochs, transform_kw, progress)
                    res["seconds"]["label_fractions"] = round(time.perf_counter() - t0, 2)
            del backbone, classifier
            res["seconds"]["total"] = round(sum(res["seconds"].values()), 2)
            report["seconds"] = round(time.perf_counter() - t_start, 2)
            _write_json(out_dir / "report.json", report)

    report["seconds"] = round(time.perf_counter() - t_start, 2)
    report["files"] = write_report(_jsonable(report), out_dir)
    _write_json(out_dir / "report.json", report)
    return report


def _label_fractions(backbone, train, test, fractions: list[float], size: int, num_classes: int, cache_dir: Path,
                     res: dict, protocols: Sequence[str], ft: dict, linear_epochs: int, transform_kw: dict,
                     progress: bool) -> dict:
    """Step 5 of the suite for one (dataset, checkpoint): ``{str(f): {"n_train", "linear", ...}}``."""
    transform = make_eval_transform(size)
    # the files step 1 wrote when it ran; extracted (and written) here otherwise
    xtr, ytr = cached_features(backbone, train, transform, cache_dir / "features_train.safetensors", **transform_kw)
    xte, yte = cached_features(backbone, test, transform, cache_dir / "features_test.safetensors", **transform_kw)
    if len(ytr) != len(train):
        raise ValueError(f"{len(train) - len(ytr)} training images could not be decoded, so features and "
                         "dataset indices do not line up: remove the unreadable files first")
    out: dict = {}
    for f in fractions:
        idx = sample_fraction(train.labels, f, ft["seed"])
        row: dict = {"n_train": len(idx)}
        # the linear protocol's probe (evaluate_frozen's arguments) on the subset's rows
        row["linear"] = linear_probe(xtr[idx], ytr[idx], xte, yte, num_classes=num_classes, epochs=linear_epochs,
                                     device=transform_kw["device"])["linear_top1"]
        if "finetune" in protocols:
            if len(idx) == len(train) and "finetune" in res:
                # the whole split: the same run as step 3 (same data, order, config and seed)
                row["finetune"] = res["finetune"]["final"][res["finetune"]["main_metric"]]
                row["finetune_steps"] = res["finetune"]["steps"]
            else:
                fcfg, _ = _finetune_cfg(ft["finetune_cfg"], ft["recipe"], size, ft["epochs"], ft["dev"], ft["seed"],
                                        len(idx), ft["scale"])
                tuned = finetune(copy.deepcopy(backbone), train.subset(idx), test, fcfg, progress=False)
                row["finetune"] = tuned["final"][tuned["main_metric"]]
                row["finetune_steps"] = tuned["steps"]
                del tuned
        out[str(f)] = row
        _log(progress, f"  {100 * f:.4g}% of the labels ({len(idx)} images): linear {row['linear']:.2f}"
                       + (f", fine-tune {row['finetune']:.2f}" if "finetune" in row else ""))
    return out


def _finetune_cfg(given: FinetuneConfig | None, recipe: str, size: int, epochs: int, dev, seed: int,
                  n_train: int, scale: float) -> tuple[FinetuneConfig, str]:
    if given is not None:
        return override(given, {"data.img_size": size, "train.device": str(dev), "train.seed": seed}), ""
    base = suite_finetune_config(size, epochs=epochs, device=str(dev), seed=seed)
    if recipe == "short":
        return base, ""
    cfg, why = hyperrule_config(base, n_train, size, scale_steps=scale)
    # the suite compares checkpoints at their own resolution: keep it, take BiT's schedule and optimizer
    return override(cfg, {"data.img_size": size}), why + f"\n  (the suite keeps {size} px instead of the rule's crop)"
