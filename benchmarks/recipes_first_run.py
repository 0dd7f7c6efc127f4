"""The recipes as a new user runs them, each beside the linear probe of the same backbone: are
`recipe.name=deit` (with and without distillation) and `recipe.name=bit` (scaled to a CPU) worth
running on a small labeled set, and do they finish in minutes?

Every run is a ``python -m keel ...`` command in a subprocess (recorded verbatim), on the built-in
``digits`` (1437 train / 360 test) at 32 px, seed 0, on the CPU:

* ``deit``: ``random:deit_tiny_patch16`` with ``model.patch_size``-free defaults is 2 x 2 tokens
  at 32 px, so the student is ``random:vit_tiny_patch4_32`` (8 x 8 tokens) fine-tuned with
  ``recipe.name=deit train.epochs=5`` (DeiT's augmentation, lr, warm-up capped at a quarter;
  ``--deit-epochs``: DeiT's repeated augmentation and RandAugment run at ~12 img/s on 2 cores).
* ``deit+hard``: the same with ``distill.kind=hard`` from a teacher made first:
  ``random:resnet10_cifar`` fine-tuned with the defaults, ``aug.hflip=0``, 10 epochs.
* ``bit``: ``random:resnetv2_14_tiny_cifar`` with ``recipe.name=bit recipe.scale=0.05`` (a
  twentieth of BiT-HyperRule's 500 steps of 512 images; the lr picked on held-out training
  images, five candidates, then the final run).
* ``probe``: ``keel eval linear`` of each random backbone (its frozen random features).

    python benchmarks/recipes_first_run.py --work /tmp/recipes

Results: ``benchmarks/results/recipes_first_run.json`` (command, wall seconds, top-1).
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "recipes_first_run.json"
COMMON = ["data.source=digits", "train.device=cpu", "train.seed=0"]


def keel(args: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "keel", *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed: keel {' '.join(args)}\n{p.stderr[-2000:]}")
    return round(time.perf_counter() - t, 1), p.stdout


def finetune(name: str, run: Path, extra: list[str]) -> dict:
    args = ["finetune", *COMMON, "--out", str(run), *extra]
    wall, _ = keel(args)
    res = json.loads((run / "result.json").read_text())
    return {"command": "keel " + " ".join(args), "wall_s": wall, "top1": round(res["final"]["top1"], 2),
            **({"teacher": res["distill"]} if "distill" in res else {})}


def probe(spec: str, work: Path) -> dict:
    out = work / f"probe-{spec.replace(':', '_')}.json"
    args = ["eval", "linear", f"model.backbone={spec}", "data.source=digits", "data.img_size=32", "run.device=cpu",
            f"eval.json={out}"]
    wall, _ = keel(args)
    res = json.loads(out.read_text())
    return {"command": "keel " + " ".join(args), "wall_s": wall, "top1": round(_find(res, "linear_top1"), 2)}


def _find(obj, key):
    """The first value of ``key`` anywhere in a nested result."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    if isinstance(obj, list):
        for v in obj:
            found = _find(v, key)
            if found is not None:
                return found
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/recipes")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--deit-epochs", type=int, default=5)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    runs["teacher"] = finetune("teacher", work / "teacher", ["model.backbone=random:resnet10_cifar", "data.img_size=32",
                                                               "aug.hflip=0", "train.epochs=10"])
    vit = ["model.backbone=random:vit_tiny_patch4_32", "data.img_size=32", "recipe.name=deit",
           f"train.epochs={a.deit_epochs}", "aug.hflip=0"]
    runs["deit"] = finetune("deit", work / "deit", vit)
    runs["deit+hard"] = finetune("deit+hard", work / "deit-hard", vit + [f"distill.teacher={work / 'teacher'}",
                                                                          "distill.kind=hard"])
    runs["bit"] = finetune("bit", work / "bit", ["model.backbone=random:resnetv2_14_tiny_cifar", "recipe.name=bit",
                                                 "recipe.scale=0.05", "recipe.max_side=32", "aug.hflip=0"])
    runs["probe vit_tiny_patch4_32"] = probe("random:vit_tiny_patch4_32", work)
    runs["probe resnetv2_14_tiny_cifar"] = probe("random:resnetv2_14_tiny_cifar", work)
    data = {"date": datetime.date.today().isoformat(), "machine": "2-core CPU", "runs": runs}
    Path(a.out).write_text(json.dumps(data, indent=1) + "\n")
    for k, v in runs.items():
        print(f"{k:32} {v['top1']:6.2f}  {v['wall_s']:7.1f} s")


if __name__ == "__main__":
    main()
