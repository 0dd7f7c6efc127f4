"""keel on a Ray cluster: Ray Train's TorchTrainer starts one worker per GPU, sets torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) and calls ``train_loop_per_worker`` in each; keel
joins that process group and runs the job as the command would.

    pip install 'ray[train]'
    python examples/ray_train.py --workers 16 --out /shared/runs/photos \
        data.source=shards:/shared/shards/photos model.name=vit_base_patch16 train.parallel=fsdp

Ray is not a keel dependency; this file imports it only to launch. The run directory must be on
storage every worker mounts; Ray's FailureConfig restarts failed workers and keel resumes from the
last checkpoint (train.auto_resume, because the run directory already holds one).
"""
from __future__ import annotations

import argparse

import keel


def train_loop_per_worker(config: dict) -> None:
    """What every worker runs: one keel job, from the config Ray hands over."""
    keel.run(config["job"], config=config.get("config"), overrides=config.get("overrides", ()),
             out=config["out"], resume=config.get("resume", False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="pretrain", choices=["pretrain", "finetune", "detect"])
    ap.add_argument("--workers", type=int, default=8, help="processes (one per GPU)")
    ap.add_argument("--cpu", action="store_true", help="CPU workers (gloo), e.g. to try it on a laptop")
    ap.add_argument("--out", required=True, help="run directory, on storage every worker sees")
    ap.add_argument("-c", "--config", help="YAML config file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    args = ap.parse_args()

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": args.job, "config": args.config, "overrides": args.overrides, "out": args.out},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=not args.cpu),
        run_config=RunConfig(failure_config=FailureConfig(max_failures=3)),
    )
    trainer.fit()


if __name__ == "__main__":
    main()
