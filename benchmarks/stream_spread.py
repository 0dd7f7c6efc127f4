"""How much of an accuracy difference is the random streams? keel's trainer with other streams.

Keeps a run's initial weights and images (both from ``train.seed``) and changes only which random
numbers the trainer draws, then evaluates as ``ssl_methods.py`` does (cpu preset):

- ``--salt N``: every stream seed of the trainer (image order, each step's views) gets an extra
  part N, so the run draws other, equally random streams;
- ``--epoch-generator``: keel's image order, but each epoch's views come from one generator
  (as ``ssl_methods.py --keel-views`` draws them) instead of one freshly seeded per step.

    python benchmarks/stream_spread.py --salt 1 train.epochs=20
    python benchmarks/stream_spread.py --epoch-generator train.epochs=20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import ssl_methods as B  # noqa: E402

import keel.engine.distributed as D  # noqa: E402
from keel.engine.trainer import Trainer  # noqa: E402
from keel.tasks.ssl import list_methods
from keel.tasks.ssl.base import _METHODS  # noqa: E402


def epoch_streams(method: str, generator, order=None) -> None:
    """Patch keel's trainer to draw each epoch's views from ``generator(epoch)`` (one generator for
    the whole epoch) and, with ``order(n, epoch)``, to shuffle with it instead of its own order."""
    list_methods()  # imports every method module, so the registry is filled
    cls, streams = _METHODS[method], {}
    epoch_batches, make_views = Trainer._epoch_batches, cls.make_views

    def batches(self, n, epoch):
        streams["gen"] = generator(epoch)
        if order is None:
            return epoch_batches(self, n, epoch)
        perm, bs = order(n, epoch), self.cfg.train.batch_size
        return [perm[s * bs:(s + 1) * bs] for s in range(n // bs)]
    Trainer._epoch_batches = batches
    cls.make_views = lambda self, images, gen: make_views(self, images, streams["gen"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="swav", choices=B.SHARED)
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--salt", type=int, help="an extra part for every stream seed")
    how.add_argument("--epoch-generator", action="store_true", help="one view generator per epoch")
    ap.add_argument("--out", default="", help="run folder (default runs/stream-spread/<method>-<how>)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=20 train.seed=1")
    args = ap.parse_args()
    cfg = B.method_config("cpu", args.method, "cnn", args.overrides)
    tc = cfg.train

    if args.salt is not None:
        seed_for = D.seed_for
        D.seed_for = lambda *parts: seed_for(*parts, args.salt)  # the trainer looks it up on D each time
        how = f"salt{args.salt}"
    else:
        epoch_streams(args.method, lambda epoch: torch.Generator().manual_seed(D.seed_for(tc.seed, epoch, 99)))
        how = "epoch-generator"

    out = Path(args.out or f"runs/stream-spread/{args.method}-{how}-seed{tc.seed}")
    device = torch.device("cpu")
    backbone, stats = B.keel_run(cfg, out, device)
    row = dict(B.evaluate(backbone, cfg.data.img_size, "cpu", device, cfg.eval.linear_epochs), **stats)
    (out / "row.json").write_text(json.dumps(row, indent=2))
    print(f"{args.method} ({how}, seed {tc.seed}): kNN@200 {row['knn200']:.2f}, kNN@20 {row['knn20']:.2f}, "
          f"linear {row['linear']:.2f}  -> {out / 'row.json'}")


if __name__ == "__main__":
    main()
