"""One function that runs a keel job from a config in this process, as the ``keel`` command does:
the entry point for launchers that call Python rather than a command (Ray Train's TorchTrainer, a
notebook, a scheduler's Python task). Under torchrun, or any launcher that sets torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), every process calls it with the same arguments.
"""
from __future__ import annotations

from pathlib import Path

from keel.config import ConfigError, FinetuneConfig, RunConfig, load_config

JOBS = ("pretrain", "finetune", "detect")


def run(job: str, config: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = (),
        out: str | Path | None = None, resume: bool = False) -> dict:
    """Run ``job`` (pretrain, finetune or detect) and return its result (what the command prints
    from). ``config``: a YAML file, the same mapping as a dict, or None for the defaults;
    ``overrides``: ``key=value`` strings on top; ``out``: the run directory (give one when a
    launcher may restart the job: ``train.auto_resume`` continues it from its last checkpoint);
    ``resume``: continue ``out`` with its own config.yaml."""
    if job not in JOBS:
        raise ConfigError(f"job must be one of {', '.join(JOBS)}, got {job!r}")
    if resume and out is None:
        raise ConfigError("resume=True needs out=<the run directory>")
    cls = {"pretrain": RunConfig, "finetune": FinetuneConfig}.get(job)
    if job == "detect":
        from keel.detection.config import DetectConfig
        cls = DetectConfig
    if resume:
        config = Path(out) / "config.yaml"
    cfg = load_config(config, list(overrides), cls=cls)
    if job == "pretrain":
        from keel.jobs.pretrain import pretrain
        return pretrain(cfg, out, resume=resume)
    if job == "finetune":
        from keel.jobs.finetune import run_finetune
        return run_finetune(None if resume else cfg, out, resume=resume)
    from keel.jobs.detect import detect_train
    return detect_train(None if resume else cfg, out, resume=resume)

