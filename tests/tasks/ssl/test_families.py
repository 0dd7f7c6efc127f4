"""Every contrastive, clustering and distillation method trains the three backbone families the
methods are meant for (a ResNet, a ViT and the seeds' conv + Transformer hybrid) through keel's
real trainer, and the gradient of each method reaches every part of each backbone.

The per-method files check each loss against lightly or a hand-computed case on a ResNet and a
ViT; here the point is the interface between method and backbone: multi-crop local views smaller
than the hybrid's total stride, heads sized from ``num_features``, frozen parts (MoCo v3 freezes a
ViT's patch embedding and nothing else), zero-initialised residual gammas that must open up after
the first step, and the exported backbone."""
from __future__ import annotations

import math

import pytest
import torch

import keel
from keel.data.sources import build_dataset
from keel.engine.trainer import Trainer
from keel.tasks.ssl import build_method

# Small settings of the registered families (seconds for all of them on 2 CPU cores).
FAMILIES = {
    "resnet": ("resnet10_cifar", dict(widths=(8, 8, 16, 16))),
    "vit": ("vit_tiny_patch4_32", dict(depth=1, dim=32, num_heads=2)),
    "hybrid": ("keel_tiny", dict(widths=(8, 16, 32, 64), depths=(1, 1, 1, 1), head_dim=8)),
}
METHODS = ["simclr", "swav", "dino", "mocov3", "byol", "simsiam", "rotation"]
STEPS = 3
# Twice the hybrid's total stride: its last map is 2x2 (at 1x1 a single token attends only to
# itself and its relative position bias rightly gets no gradient), and multi-crop's 32 px local
# crops make 1x1 maps.
IMG = 64


def _frozen(method: str, family: str, name: str) -> bool:
    """The backbone parameters a method keeps fixed on purpose."""
    return method == "mocov3" and family == "vit" and name.startswith("patch_embed.")  # MoCo v3's trick


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits", "train", IMG, subset=64, seed=0)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method_name", METHODS)
def test_method_trains_every_part_of_each_family(method_name, family, digits, make_cfg, tmp_path):
    model, kw = FAMILIES[family]
    # No weight decay: a parameter moves only if its gradient reached it.
    cfg = make_cfg(f"method.name={method_name}", f"model.name={model}", f"data.img_size={IMG}",
                   "train.batch_size=16", f"train.max_steps={STEPS}", "train.warmup_epochs=0",
                   "train.weight_decay=0", "train.lr=0.01", "method.num_prototypes=16", "method.out_dim=64")
    torch.manual_seed(0)
    backbone = keel.create_model(model, img_size=IMG, **kw)
    method = build_method(method_name, backbone, cfg)
    start = {k: v.clone() for k, v in method.backbone.state_dict().items()}

    result = Trainer(cfg, tmp_path / "run", quiet=True).fit(method, digits)

    assert result["steps"] == STEPS and math.isfinite(result["loss"])
    after = method.backbone.state_dict()
    for name, p in method.backbone.named_parameters():
        moved = not torch.equal(after[name], start[name])
        assert torch.isfinite(after[name]).all(), name
        if _frozen(method_name, family, name):
            assert not moved and not p.requires_grad, f"{name} should stay frozen"
        else:
            assert moved, f"{method_name} on {family}: {name} got no gradient in {STEPS} steps"
    # what is exported is a backbone of the same family, with the same feature width
    exported = method.export_backbone()
    assert type(exported) is type(backbone) and exported.num_features == backbone.num_features
    x = digits.images[:4].float() / 255
    assert exported.embed(x).shape == (4, backbone.num_features)
