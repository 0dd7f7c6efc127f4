"""Is keel's trainer the same computation as ssl_methods.py's lightly loop? A check, not a timing.

``ssl_methods.py --no-keel --keel-views --keel-method`` runs keel's views and keel's method module
inside the loop it uses for lightly's methods. That loop and keel's ``Trainer`` differ only in
their random streams: the ablation shuffles with (seed + epoch) and draws each epoch's views from
one generator, keel's trainer draws every step's views from a generator seeded with
(seed, step, rank) so that a resumed run repeats them. This script gives keel's trainer the
ablation's streams and trains both for a few steps: if the loops agree, the backbones are equal
bit for bit, and any accuracy difference between the two runs comes from the streams alone.

    python benchmarks/loop_identity.py                      # SwAV, 40 steps (the prototypes unfreeze at 31)
    python benchmarks/loop_identity.py --method dino --steps 10
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import ssl_methods as B  # noqa: E402

from keel.jobs.pretrain import pretrain  # noqa: E402
from stream_spread import epoch_streams  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="swav", choices=B.SHARED)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.seed=1")
    args = ap.parse_args()
    cfg = B.method_config("cpu", args.method, "cnn", ["train.epochs=20", f"train.max_steps={args.steps}",
                                                      *args.overrides])
    tc, device = cfg.train, torch.device("cpu")
    ablation, _ = B.lightly_fit(args.method, cfg, device, keel_views=True, keel_method=True)

    # keel's trainer with the ablation's streams (B.KeelViews): its order and one generator per epoch
    epoch_streams(args.method, lambda epoch: B.KeelViews.generator(tc.seed, epoch),
                  lambda n, epoch: B.KeelViews.order(n, tc.seed, epoch))
    with tempfile.TemporaryDirectory() as run_dir:
        pretrain(cfg, run_dir, quiet=True)
        # the ablation returns what lightly's loops train (DINO: the student, not the exported teacher)
        keel = B.keel_student(cfg, run_dir)

    a, b = ablation.state_dict(), keel.state_dict()
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    worst = max(diff, key=diff.get)
    print(f"{args.method}, {args.steps} steps: {len(diff)} tensors, largest difference {diff[worst]:.3g} ({worst})")
    print("identical" if diff[worst] == 0 else "NOT identical")
    sys.exit(0 if diff[worst] == 0 else 1)


if __name__ == "__main__":
    main()
