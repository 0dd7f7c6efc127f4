from keel.models.layers.attention import Attention
from keel.models.layers.drop import DropPath
from keel.models.layers.mlp import Mlp

__all__ = ["Attention", "DropPath", "Mlp"]
