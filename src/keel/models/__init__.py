"""keel's backbones. Importing the package imports every family, which registers its models,
so ``keel.models.registry`` is complete whichever module was imported first."""
from keel.models import cswin, hybrid, resnet, resnetv2, swin, vit  # noqa: F401
from keel.models.registry import create_model, family_of, list_models, register_model

__all__ = ["create_model", "family_of", "list_models", "register_model"]
