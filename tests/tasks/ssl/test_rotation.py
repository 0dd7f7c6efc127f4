"""Rotation prediction: the four rotations pixel by pixel, the views (crop/flip, no colour
changes), the loss and accuracy on a hand-computed case, and one real training run."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import keel
from keel.config import RunConfig
from keel.tasks.ssl import build_method
from keel.tasks.ssl.rotation import Rotation, rotate_four


def test_rotations_by_hand():
    # 0 1 2        rot 90 ccw: 2 5 8    180: 8 7 6    270: 6 3 0
    # 3 4 5                    1 4 7         5 4 3         7 4 1
    # 6 7 8                    0 3 6         2 1 0         8 5 2
    x = torch.arange(9.0).view(1, 1, 3, 3)
    out, labels = rotate_four(x)
    assert out.shape == (4, 1, 3, 3) and labels.tolist() == [0, 1, 2, 3]
    assert out[0, 0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert out[1, 0].tolist() == [[2, 5, 8], [1, 4, 7], [0, 3, 6]]
    assert out[2, 0].tolist() == [[8, 7, 6], [5, 4, 3], [2, 1, 0]]
    assert out[3, 0].tolist() == [[6, 3, 0], [7, 4, 1], [8, 5, 2]]
    # one pixel: the top-right corner goes to the top-left under a quarter turn counter-clockwise
    assert out[1, 0, 0, 0] == x[0, 0, 0, 2]


def test_four_copies_of_every_image_in_label_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 6, 6, generator=g)
    out, labels = rotate_four(x)
    assert out.shape == (20, 3, 6, 6)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    for k in range(4):
        assert torch.equal(out[5 * k:5 * (k + 1)], torch.rot90(x, k, dims=(2, 3)))
    # four quarter turns are the identity, and label 3 is label 1 turned twice more
    assert torch.equal(torch.rot90(out[15:], 1, dims=(2, 3)), x)
    assert torch.equal(torch.rot90(out[5:10], 2, dims=(2, 3)), out[15:])
    with pytest.raises(ValueError, match="square"):
        rotate_four(torch.zeros(1, 3, 4, 6))


def _cfg(img_size: int = 8) -> RunConfig:
    cfg = RunConfig()
    cfg.data.img_size = img_size
    return cfg


def _resnet():
    return keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16))


def test_views_are_crop_flip_then_rotations_without_colour_changes():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cfg = _cfg()
    m = Rotation(_resnet(), cfg)
    assert cfg.aug.jitter_p > 0 and cfg.aug.gray_p > 0  # on in the run's aug section...
    assert m.augment.cfg.jitter_p == 0 and m.augment.cfg.gray_p == 0  # ...off for rotations
    assert m.augment.cfg.scale == (cfg.aug.scale_min, 1.0) and m.augment.cfg.hflip == cfg.aug.hflip
    x, labels = m.make_views(images, torch.Generator().manual_seed(1))
    assert x.shape == (12, 3, 8, 8) and x.dtype == torch.float32
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    y, _ = m.make_views(images, torch.Generator().manual_seed(1))
    assert torch.equal(x, y)  # reproducible from the generator
    # the whole image, no flip: the view is the normalized image, then its rotations
    cfg.aug.scale_min, cfg.aug.hflip = 1.0, 0.0
    x, _ = Rotation(_resnet(), cfg).make_views(images, torch.Generator().manual_seed(1))
    base = (images.float() / 255 - 0.5) / 0.5
    for k in range(4):
        torch.testing.assert_close(x[3 * k:3 * (k + 1)], torch.rot90(base, k, dims=(2, 3)), atol=1e-6, rtol=0)


def test_loss_and_accuracy_on_a_hand_computed_case():
    torch.manual_seed(0)
    m = build_method("rotation", _resnet(), _cfg())
    assert isinstance(m, Rotation) and isinstance(m.head, nn.Linear) and m.head.out_features == 4
    m.train()
    x, labels = rotate_four(torch.randn(4, 3, 8, 8))
    # a head that always says "180 degrees" with logits (0, 0, 5, 0): right on a quarter of the
    # inputs; loss = mean of -log softmax = log(e^5 + 3) - 5/4 (a quarter at -5, all + log Z)
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    out = m((x, labels))
    assert out["rot_acc"].item() == pytest.approx(0.25)
    assert out["loss"].item() == pytest.approx(math.log(math.exp(5) + 3) - 5 / 4, abs=1e-6)
    # and in general the loss is the cross-entropy of the head's logits
    torch.manual_seed(1)
    m = Rotation(_resnet(), _cfg())
    m.train()
    out = m((x, labels))
    with torch.no_grad():
        logits = m.head(m.backbone.embed(x))
        ref = nn.functional.cross_entropy(logits, labels)
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert out["rot_acc"].item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert out["loss"].dtype == torch.float32 and not out["rot_acc"].requires_grad
    out["loss"].backward()
    for name, p in m.named_parameters():  # DDP: no parameter unused
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_loss_is_float32_under_autocast():
    torch.manual_seed(0)
    m = Rotation(keel.create_model("vit_tiny_patch4_32", img_size=8, depth=1, dim=32, num_heads=2), _cfg())
    x, labels = rotate_four(torch.randn(2, 3, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m((x, labels))
    assert out["loss"].dtype == torch.float32 and math.isfinite(out["loss"].item())


def test_pretrain_smoke(make_cfg, tmp_path):
    from keel.jobs.pretrain import pretrain
    cfg = make_cfg("method.name=rotation", "train.max_steps=2", "train.batch_size=16")  # 64 rotated inputs
    result = pretrain(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result["steps"] == 2 and math.isfinite(result["loss"])
    assert (tmp_path / "run" / "backbone.safetensors").is_file()
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if s]
    assert [rec["step"] for rec in lines] == [1, 2]
    assert all(0.0 <= rec["rot_acc"] <= 1.0 for rec in lines)  # the accuracy is logged
