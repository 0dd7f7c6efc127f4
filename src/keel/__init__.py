"""keel: pretrain vision backbones on your own images and transfer them to your tasks."""
from keel.engine.checkpoint import load_backbone as _load
from keel.models.registry import create_model, list_models
from keel.version import __version__


def load_backbone(path, map_location="cpu"):
    """Rebuild a backbone from a run's ``backbone.safetensors`` + ``card.json``."""
    return _load(path, map_location=map_location)


def run(job, config=None, overrides=(), out=None, resume=False):
    """Run a keel job (pretrain, finetune, detect) from a config in this process, as the command
    does; see :func:`keel.jobs.run.run`."""
    from keel.jobs.run import run as _run
    return _run(job, config, overrides, out, resume)


__all__ = ["create_model", "list_models", "load_backbone", "run", "__version__"]
