"""Size of a model without building its weights: parameters and multiply-accumulates.

Models are built on the meta device, so even ViT-L or BiT-R152x4 cost no memory and no
initialisation; MACs come from torch's FLOP counter (matmuls, convolutions, attention) on one
image at the model's default resolution. Like the papers' "FLOPs", these are MACs.

Counting runs every op through PyTorch's Python meta kernels (about 12 s for all models on two
cores), so ``keel models`` reads the counts of the registered models at their defaults from
``stats_table.json``, written by ``python -m keel.models.stats`` and checked against a fresh
count by the tests; a model not in the table is counted on the spot."""
from __future__ import annotations

import functools
import json
from pathlib import Path

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


TABLE = Path(__file__).with_name("stats_table.json")


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE.read_text()) if TABLE.is_file() else {}


def cached_stats(name: str, num_classes: int) -> dict:
    """:func:`model_stats` at the model's defaults, from the table when it holds the model."""
    return _table().get(f"{name}@{num_classes}") or model_stats(name, num_classes=num_classes)


def write_table() -> None:
    from keel.models.registry import list_models
    table = {f"{n}@{c}": model_stats(n, num_classes=c) for n in list_models() for c in (0, 1000)}
    TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_table()
    print(f"wrote {TABLE}")
