"""Do keel's fine-tuning defaults give a good result? Default full fine-tuning beside the linear
probe of the same backbone at the same number of epochs (the issue "Defaults that give a good
result": full fine-tuning must be at least as good as the probe, short runs and long ones).

For each dataset, backbone, epoch count and seed, two numbers on the dataset's test split:

* ``finetune``: ``keel.jobs.finetune.finetune(backbone, train, test, cfg)`` with cfg =
  ``FinetuneConfig()`` (the defaults) plus only what the run has to say: ``data.img_size=32``,
  ``train.epochs``, ``train.seed``, ``train.device=cpu``, ``train.eval_every=0`` (one evaluation,
  at the end); the number is ``final`` top-1 (the last epoch, not the best one).
* ``linear``: ``keel.evaluate.frozen.evaluate_frozen(backbone, ..., protocols=("linear",),
  linear_epochs=<the same epochs>)`` on a fresh copy of the same backbone (the probe trains on
  un-augmented, standardized features with its own fixed recipe).

Datasets (all at 32 px):

* ``digits``: keel's built-in (sklearn's 8x8 digits; 1437 train, 360 test).
* ``fashion``: Fashion-MNIST from /usr/share/datasets/fashion-mnist, a fixed 10k subset of the
  training split (``labeled_splits(...)[0].subset(idx)``, idx from ``torch.Generator`` seed 0; the
  same subset for every run; ``data.subset`` is not implemented for fine-tuning), the full 10k
  test split.
* ``folder``: a labeled image folder made by this script under ``--work``: 4 classes (skimage.data's
  astronaut, chelsea, coffee, rocket photos), 150 PNGs each, each a random square crop (side 15-35%
  of the photo's shorter side, random position, numpy seed 0) resized to 32 px; ``labeled_splits``
  holds out every 5th image as test (480 train, 120 test).

Backbones: ``random:resnet10_cifar`` (initialised with the run's seed) and ``simclr``, the run
directory of ``keel pretrain method.name=simclr model.name=resnet10_cifar data.source=digits
train.epochs=5`` (``--simclr``; made once, seed 0).

BEFORE is ``--before`` on today's code: it sets back what the fix changed (AdamW lr 5e-4 per 256,
batch 128, crop area 0.35-1, MAE's head init std 2e-5); AFTER is the defaults as they are (batch
32, AdamW 4e-3 per 256, i.e. 5e-4 per step). ``first-fix`` in the results file is the first
attempt, kept for the record: batch 128, lr 1e-3 per 256 (``--set train.batch_size=128
train.lr=1e-3``). The warm-up cap
(``train.warmup_max_fraction=0.25``) is in both.

``--set key=value`` overrides fine-tuning keys (the search of new defaults); ``--head-std`` replaces
the classification head's init by a truncated normal of that std (``0`` = zeros, ``-1`` = PyTorch's
nn.Linear default) for the search of the head's init. Results are merged into ``--out`` under
``--label`` (one entry per dataset/backbone/epochs/seed), so a table can be built from several
invocations; ``--table`` prints the markdown table of the labels given by ``--compare``.

    python benchmarks/finetune_defaults.py --label before --seeds 0 1 2 --simclr RUN_DIR
    python benchmarks/finetune_defaults.py --table --compare before after
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from keel import hub
from keel.config import FinetuneConfig, override, parse_overrides
from keel.data.sources import labeled_splits
from keel.evaluate.frozen import evaluate_frozen
from keel.jobs.finetune import finetune

OUT = Path(__file__).parent / "results" / "finetune_defaults.json"
FOLDER_CLASSES = ("astronaut", "chelsea", "coffee", "rocket")


def make_folder(root: Path, per_class: int = 150, side: int = 32) -> Path:
    """The labeled folder described in the module docstring (made once; reused when present)."""
    from PIL import Image
    import skimage.data
    done = root / ".done"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for name in FOLDER_CLASSES:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        h, w = img.shape[:2]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            s = int(rng.uniform(0.15, 0.35) * min(h, w))
            y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            crop = Image.fromarray(img[y:y + s, x:x + s, :3]).resize((side, side), Image.BICUBIC)
            crop.save(root / name / f"{i:03d}.png")
    done.touch()
    return root


def datasets(names: list[str], work: Path) -> dict:
    out = {}
    for name in names:
        if name == "digits":
            out[name] = labeled_splits("digits", 32)
        elif name == "fashion":
            train, test = labeled_splits("fashion-mnist", 32)
            idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:10_000].sort().values
            out[name] = (train.subset(idx), test)
        elif name == "folder":
            out[name] = labeled_splits(str(make_folder(work / "folder")), 32)
        else:
            raise SystemExit(f"unknown dataset {name!r}")
    return out


def set_head_init(std: float | None) -> None:
    """For the search only: replace ClassificationTask.head's init."""
    if std is None:
        return
    import torch.nn as nn
    from keel.models.layers.init import trunc_normal_
    from keel.tasks.classify import ClassificationTask

    def head(self, num_features):
        h = nn.Linear(num_features, self.num_classes)
        if std >= 0:
            trunc_normal_(h.weight, std=std) if std > 0 else nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)
        return h
    ClassificationTask.head = head


def one(backbone_spec: str, train, test, epochs: int, seed: int, extra: dict, probe: bool) -> dict:
    row = {}
    if probe:
        bb, _ = hub.resolve_backbone(backbone_spec, 32, seed=seed)
        t = time.perf_counter()
        r = evaluate_frozen(bb.eval(), train, test, 32, protocols=("linear",), linear_epochs=epochs)
        row.update(linear=round(r["linear_top1"], 2), linear_s=round(time.perf_counter() - t, 1))
    bb, _ = hub.resolve_backbone(backbone_spec, 32, seed=seed)
    cfg = override(FinetuneConfig(), {"data.img_size": 32, "train.epochs": epochs, "train.seed": seed,
                                      "train.device": "cpu", "train.eval_every": 0, **extra})
    t = time.perf_counter()
    r = finetune(bb, train, test, cfg, progress=False)
    row.update(finetune=round(r["final"]["top1"], 2), finetune_s=round(time.perf_counter() - t, 1))
    return row


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def table(data: dict, labels: list[str]) -> str:
    """Markdown: one row per dataset/backbone/epochs; per label the fine-tuning mean ± sd, and the probe."""
    def stat(xs):
        if not xs:
            return "—"
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"
    groups: dict[tuple, dict] = {}
    for label in labels:
        for key, row in data["runs"].get(label, {}).items():
            ds, bb, ep, seed = key.split("|")
            g = groups.setdefault((ds, bb, int(ep)), {})
            g.setdefault(label, []).append(row["finetune"])
            if "linear" in row:
                g.setdefault("linear", {})[seed] = row["linear"]
    head = "| dataset | backbone | epochs | linear probe | " + " | ".join(f"finetune {l}" for l in labels) + " | n |"
    lines = [head, "|" + "---|" * (5 + len(labels))]
    for (ds, bb, ep), g in sorted(groups.items()):
        n = max(len(g.get(l, [])) for l in labels)
        lines.append(f"| {ds} | {bb} | {ep} | {stat(list(g.get('linear', {}).values()))} | "
                     + " | ".join(stat(g.get(l, [])) for l in labels) + f" | {n} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="after")
    p.add_argument("--datasets", nargs="+", default=["digits", "fashion", "folder"])
    p.add_argument("--backbones", nargs="+", default=["random", "simclr"])
    p.add_argument("--epochs", nargs="+", type=int, default=[5, 30])
    p.add_argument("--fashion-epochs", nargs="+", type=int, default=None, help="epochs for fashion (default: --epochs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--simclr", default="/tmp/fd/runs/simclr5", help="the SimCLR pretraining run directory")
    p.add_argument("--set", nargs="*", default=[], help="fine-tuning overrides key=value (search)")
    p.add_argument("--head-std", type=float, default=None, help="search: head init std (0 zeros, -1 nn.Linear's)")
    p.add_argument("--before", action="store_true", help="the defaults before the issue's fix: lr 5e-4 per 256, "
                   "crop area 0.35-1, head init std 2e-5 (the same computation as the old code)")
    p.add_argument("--no-probe", action="store_true", help="reuse the probe of an earlier label (it does not change)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 when two runs share 2 cores)")
    p.add_argument("--work", default="/tmp/fd")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--table", action="store_true")
    p.add_argument("--compare", nargs="+", default=["before", "after"])
    a = p.parse_args()
    out = Path(a.out)
    if a.table:
        print(table(load(out), a.compare))
        return
    torch.set_num_threads(a.threads)
    if a.before:
        a.head_std = 2e-5 if a.head_std is None else a.head_std
        a.set = ["train.lr=5e-4", "train.batch_size=128", "aug.scale_min=0.35", *a.set]
    set_head_init(a.head_std)
    extra = _flat(parse_overrides(a.set))
    specs = {"random": "random:resnet10_cifar", "simclr": a.simclr}
    for name, (train, test) in datasets(a.datasets, Path(a.work)).items():
        for bb in a.backbones:
            for ep in (a.fashion_epochs or a.epochs) if name == "fashion" else a.epochs:
                for seed in a.seeds:
                    row = one(specs[bb], train, test, ep, seed, extra, probe=not a.no_probe)
                    key = f"{name}|{bb}|{ep}|{seed}"
                    print(a.label, key, row, flush=True)
                    data = load(out)          # re-read: merge into what is there
                    data.update(date=datetime.date.today().isoformat(), machine="2-core CPU")
                    cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
                    cmds = data.setdefault("commands", {}).setdefault(a.label, [])
                    cmds = data["commands"][a.label] = [cmds] if isinstance(cmds, str) else cmds
                    if cmd not in cmds:
                        cmds.append(cmd)
                    data.setdefault("settings", {})[a.label] = {"set": a.set, "head_std": a.head_std}
                    data["runs"].setdefault(a.label, {})[key] = row
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(data, indent=1) + "\n")


def _flat(nested: dict, prefix: str = "") -> dict:
    """parse_overrides' nested dict back to override()'s {"section.key": value}."""
    flat = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


if __name__ == "__main__":
    main()
