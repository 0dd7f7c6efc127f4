"""Size of a model without building its weights: parameters and multiply-accumulates.

Models are built on the meta device, so even ViT-L or BiT-R152x4 cost no memory and no
initialisation; MACs come from torch's FLOP counter (matmuls, convolutions, attention) on one
image at the model's default resolution. Like the papers' "FLOPs", these are MACs."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from keel.models.registry import create_model


def default_img_size(model) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "img_size", 224))


def model_stats(name: str, num_classes: int = 1000, img_size: int | None = None, **kw) -> dict:
    """{"params_m", "gmacs", "img_size", "feature_info"} for model ``name``."""
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **kw)
        size = img_size or default_img_size(model)
        params = sum(p.numel() for p in model.parameters())
        model.eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, size, size))
    return {"params_m": params / 1e6, "gmacs": counter.get_total_flops() / 2e9, "img_size": size,
            "feature_info": list(model.feature_info)}
