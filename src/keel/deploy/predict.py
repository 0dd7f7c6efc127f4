"""``keel predict``: a fine-tuned classifier run over a folder, one image file or a built-in dataset,
written as one CSV row per image.

* Single-label runs: ``path,top1,p1,...,topK,pK,error``, the K most probable classes with their
  softmax probabilities, most probable first.
* Multi-label runs (fine-tuned on an ``image,labels`` CSV): ``path,labels,probabilities,error``,
  every class whose sigmoid reaches the run's ``task.threshold`` (one threshold for all classes, as
  training scored F1), ``;``-separated, most probable first, with their probabilities likewise.
* A file that cannot be decoded gets a row with empty predictions and the reason in ``error``:
  nothing is dropped and nothing crashes. Rows keep the source's order (a folder's sorted paths; a
  built-in's ``digits:test:17``).

What a fine-tune run holds (:mod:`keel.jobs.finetune`): ``classifier.safetensors`` (backbone +
head) and ``config.yaml`` (the backbone spec, ``data.img_size``, ``data.source``, ``task.threshold``),
no class list: the class names are read again from ``data.source`` exactly as training read them
(:func:`keel.jobs.finetune.labeled_data`). When that source is gone, classes are numbered and the
run says so. Two-level runs and detection runs are refused with a one-line error naming what to
use instead (``keel detect predict`` for detectors).

Images are seen as evaluation sees them: shorter side resized to the run's image size,
centre-cropped, normalised (:func:`keel.evaluate.frozen.make_eval_transform`); float32 throughout,
so the probabilities equal the eager model's.
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from keel.files import atomic_write_with
from keel.data.errors import DataError

__all__ = ["ClassifierRun", "finetune_run", "load_classifier_run", "open_data", "predict"]


@dataclass
class ClassifierRun:
    """What a fine-tune run says about its classifier."""
    spec: str
    run_dir: Path
    weights: Path                   # the classifier*.safetensors read
    kind: str                       # "single" | "multilabel"
    classes: list[str]
    img_size: int
    threshold: float                # multi-label: sigmoid >= threshold means present
    source: str                     # the data.source it was fine-tuned on
    note: str = ""                  # why the classes are numbered, when they are


def finetune_run(spec: str, arg: str = "--checkpoint") -> tuple[Path, Path] | None:
    """``(run dir, classifier weights)`` when ``spec`` is a fine-tune run directory or one of its
    ``classifier*.safetensors`` files, None for anything else (a pretraining run, ``random:``...).
    A detection run is an error that names ``keel detect predict``."""
    if spec.startswith(("random:", "timm:")):
        return None
    p = Path(spec).expanduser()
    if (p.is_dir() and (p / "detector.safetensors").is_file()) or (p.is_file() and p.name.startswith("detector")):
        run = p if p.is_dir() else p.parent
        raise ValueError(f"{arg}: '{spec}' is a keel detect run: predict its boxes with "
                         f"`keel detect predict --checkpoint {run} --data IMAGE_OR_FOLDER`")
    if p.is_dir() and (p / "classifier.safetensors").is_file():
        return p, p / "classifier.safetensors"
    if p.is_file() and p.suffix == ".safetensors" and p.name.startswith("classifier"):
        return p.parent, p
    return None


def _head_shape(weights: Path, spec: str, arg: str) -> tuple[str, int]:
    """(head kind, classes) from the file's header alone (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        for key in ("head.weight", "head.cls.weight"):
            if key in keys:
                return "linear", int(f.get_slice(key).get_shape()[0])
    if "head.primary.weight" in keys:
        raise ValueError(f"{arg}: '{spec}' is a two-level (primary/secondary) classifier: keel predict and "
                         "keel export take single-label and multi-label runs")
    raise ValueError(f"{arg}: '{weights}' holds no classifier head (head.weight): not a keel fine-tune run")


def load_classifier_run(spec: str, img_size: int | None = None, arg: str = "--checkpoint"
                        ) -> tuple[nn.Module, ClassifierRun]:
    """The classifier of a fine-tune run (eval mode, frozen, on the CPU) and what the run says
    about it. ``img_size``: build it for another side (a ViT's positions are resampled)."""
    from keel import hub
    from keel.config import FinetuneConfig, load_config, override
    from keel.evaluate.multilabel import MultiLabelTask, TwoLevelTask
    from keel.jobs.finetune import labeled_data

    found = finetune_run(spec, arg)
    if found is None:
        raise ValueError(f"{arg}: '{spec}' is not a fine-tune run: give a `keel finetune` run directory "
                         "(or one of its classifier*.safetensors files)")
    run_dir, weights = found
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{arg}: '{spec}' has no config.yaml beside its classifier")
    cfg = load_config(run_dir / "config.yaml", cls=FinetuneConfig)
    _, num_classes = _head_shape(weights, spec, arg)
    size = int(img_size or cfg.data.img_size or hub.default_img_size(str(weights), arg))
    source = str(cfg.data.source)
    kind, threshold, note = "single", float(cfg.task.threshold), ""
    try:
        # classes only: a built-in is decoded at 8 px here (fashion-mnist at 224 px would take GBs)
        train, _, objective = labeled_data(override(cfg, {"data.img_size": 8}))
    except (DataError, OSError, ValueError) as e:
        classes = [str(k) for k in range(num_classes)]
        kind = "multilabel" if source.lower().endswith(".csv") else "single"
        note = f"class names unknown ({str(e).splitlines()[0]}): classes are numbered 0..{num_classes - 1}"
    else:
        if isinstance(objective, TwoLevelTask):
            raise ValueError(f"{arg}: '{spec}' is a two-level (primary/secondary) classifier: keel predict "
                             "and keel export take single-label and multi-label runs")
        if isinstance(objective, MultiLabelTask):
            kind, threshold = "multilabel", objective.threshold
        classes = [str(c) for c in (getattr(train, "classes", None) or range(num_classes))]
        if len(classes) < num_classes:     # labels beyond the named classes (an in-memory dataset)
            classes += [str(k) for k in range(len(classes), num_classes)]
        if len(classes) != num_classes:
            raise ValueError(f"{arg}: '{spec}' predicts {num_classes} classes but its data.source '{source}' "
                             f"now has {len(classes)}: the source changed since the run")
    model = hub.resolve_classifier(str(weights), num_classes, size, arg=arg)
    return model, ClassifierRun(spec, run_dir, weights, kind, classes, size, threshold, source, note)


# ---------------------------------------------------------------------------------- data
def open_data(data: str, img_size: int, split: str = "test"):
    """``(dataset, name of item i)`` for a folder (every image under it, recursively), one image
    file, or a built-in dataset (its ``split``)."""
    from keel.data.folders import ImageFolder
    from keel.data.shards import is_shards
    from keel.data.sources import build_dataset, builtin_names, is_fashion_dir

    if is_shards(data):
        raise DataError("keel predict reads folders, image files and built-ins; shards are a training format: "
                        "give the folder they were made from")
    path = os.path.expanduser(str(data))
    if os.path.isfile(path):        # one image (a file that does not decode becomes an error row)
        path = os.path.abspath(path)
        ds = ImageFolder(os.path.dirname(path), img_size, paths=[path])
    elif os.path.isdir(path) and not is_fashion_dir(path):
        ds = ImageFolder(path, img_size)
    else:
        ds = build_dataset(data, split, img_size, labeled=True)
        if data in builtin_names():
            return ds, lambda i: f"{data}:{split}:{i}"
    if getattr(ds, "paths", None) is None:
        return ds, lambda i: f"{getattr(ds, 'name', data)}:{split}:{i}"
    return ds, lambda i: ds.paths[i]


# ---------------------------------------------------------------------------------- rows
def _rows_single(logits: torch.Tensor, classes: list[str], k: int) -> list[list[str]]:
    probs = torch.softmax(logits.float(), dim=1)
    p, idx = probs.topk(k, dim=1)
    return [[v for c, q in zip(ci, pi) for v in (classes[c], f"{q:.6f}")]
            for ci, pi in zip(idx.tolist(), p.tolist())]


def _rows_multilabel(logits: torch.Tensor, classes: list[str], threshold: float) -> list[list[str]]:
    probs = torch.sigmoid(logits.float())
    rows = []
    for row in probs.tolist():
        hits = sorted(((q, c) for c, q in enumerate(row) if q >= threshold), key=lambda t: -t[0])
        rows.append([";".join(classes[c] for _, c in hits), ";".join(f"{q:.6f}" for q, _ in hits)])
    return rows


def header(run: ClassifierRun, k: int) -> list[str]:
    if run.kind == "multilabel":
        return ["path", "labels", "probabilities", "error"]
    return ["path", *[f"{name}{j}" for j in range(1, k + 1) for name in ("top", "p")], "error"]


def predict(checkpoint: str, data: str, out: str | os.PathLike | None = None, *, k: int = 5,
            batch_size: int = 64, num_workers: int = 2, device: str = "auto", img_size: int | None = None,
            split: str = "test", progress: bool = True) -> dict:
    """Write the predictions of the fine-tune run ``checkpoint`` on ``data`` to ``out`` (default:
    ``<run>/predictions-<data name>.csv``) and return ``{"out", "kind", "images", "predicted",
    "skipped", "seconds", "images_per_s", "classes", "note"}``. The CSV appears whole or not at
    all (written aside, then renamed)."""
    from tqdm import tqdm

    from keel.data.batches import load_batches
    from keel.engine.distributed import resolve_device
    from keel.evaluate.frozen import make_eval_transform

    if k < 1:
        raise ValueError(f"-k must be at least 1, got {k}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError("--batch must be >= 1 and --num-workers >= 0")
    model, run = load_classifier_run(checkpoint, img_size)
    if run.note and progress:
        print(f"note: {run.note}")
    ds, name_of = open_data(data, run.img_size, split)
    k = min(k, len(run.classes))
    out = Path(out) if out else run.run_dir / f"predictions-{Path(str(data).rstrip('/')).stem or 'data'}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    transform = make_eval_transform(run.img_size)
    blank = [""] * (len(header(run, k)) - 2)
    index_batches = list(torch.arange(len(ds)).split(batch_size))
    skipped: dict[int, str] = {}
    predicted = 0
    t0 = time.perf_counter()

    def write(fh) -> None:
        nonlocal predicted
        with tqdm(total=len(ds), desc="predict", unit="img", dynamic_ncols=True, disable=not progress) as bar:
            writer = csv.writer(fh)
            writer.writerow(header(run, k))
            batches = load_batches(ds, index_batches, dev, num_workers, skipped=skipped, index=True)
            for idx, batch in zip(index_batches, batches):
                rows: dict[int, list[str]] = {}
                if len(batch["images"]):       # else no file of the batch decoded
                    with torch.no_grad():
                        logits = model(transform(batch["images"])).float().cpu()
                    made = (_rows_multilabel(logits, run.classes, run.threshold) if run.kind == "multilabel"
                            else _rows_single(logits, run.classes, k))
                    rows = dict(zip(batch["index"].tolist(), made))
                for i in idx.tolist():
                    if i in rows:
                        writer.writerow([name_of(i), *rows[i], ""])
                    else:
                        writer.writerow([name_of(i), *blank, skipped.get(i, "cannot decode")])
                predicted += len(rows)
                bar.update(len(idx))         # tqdm shows the rate in img/s

    atomic_write_with(out, write)        # the CSV appears whole, or not at all
    seconds = time.perf_counter() - t0
    return {"out": out, "kind": run.kind, "images": len(ds), "predicted": predicted,
            "skipped": len(ds) - predicted, "seconds": round(seconds, 3),
            "images_per_s": round(len(ds) / seconds, 1) if seconds > 0 else 0.0,
            "classes": len(run.classes), "note": run.note}
