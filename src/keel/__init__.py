"""keel: pretrain vision backbones on your own images and transfer them to your tasks."""
from keel.engine.checkpoint import load_backbone as _load
from keel.models.registry import create_model, list_models
from keel.version import __version__


def load_backbone(path, map_location="cpu"):
    """Rebuild a backbone from a run's ``backbone.safetensors`` + ``card.json``."""
    return _load(path, map_location=map_location)


__all__ = ["create_model", "list_models", "load_backbone", "__version__"]
