"""keel.evaluate.hyperrule: BiT-HyperRule's table at its boundaries, and its conversion into a
FinetuneConfig checked by hand and against BiT's own lr rule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from keel.data.sources import build_dataset
from keel.engine.optim import step_lr
from keel.evaluate.finetune import FinetuneConfig, finetune
from keel.evaluate.hyperrule import hyperrule, hyperrule_config
from keel.models.registry import create_model


@pytest.mark.parametrize("n, schedule, mixup", [
    (1, [100, 200, 300, 400, 500], 0.0),
    (19_999, [100, 200, 300, 400, 500], 0.0),
    (20_000, [500, 3000, 6000, 9000, 10000], 0.1),
    (499_999, [500, 3000, 6000, 9000, 10000], 0.1),
    (500_000, [500, 6000, 12000, 18000, 20000], 0.1),
    (1_281_167, [500, 6000, 12000, 18000, 20000], 0.1),
])
def test_schedule_and_mixup_by_dataset_size(n, schedule, mixup):
    c = hyperrule(n, 32)
    assert c.schedule == schedule and c.mixup_alpha == mixup
    assert c.warmup_steps == schedule[0] and c.decay_steps == schedule[1:4] and c.total_steps == schedule[4]
    assert (c.lr, c.batch_size, c.momentum, c.weight_decay) == (0.003, 512, 0.9, 0.0)


@pytest.mark.parametrize("side, resize_crop", [
    (8, (160, 128)), (95, (160, 128)), (96, (512, 480)), (224, (512, 480)),
    ((95, 97), (160, 128)),     # 9215 px < 96 * 96 = 9216: the rule looks at the area
    ((48, 192), (512, 480)),    # 9216 px, not below
    ((32, 1000), (512, 480)),
])
def test_resolution_by_area(side, resize_crop):
    c = hyperrule(1000, side)
    assert (c.resize, c.crop) == resize_crop


def test_conversion_small_dataset_by_hand():
    cfg, why = hyperrule_config(FinetuneConfig(mode="partial", seed=3), n_train=1437, image_side=8)
    # 500 steps x 512 images / 1437 = 178.15 passes -> 179 epochs; 512 images per batch
    assert cfg.epochs == 179 and cfg.batch_size == 512
    assert cfg.milestones == pytest.approx([0.4, 0.6, 0.8])      # 200, 300, 400 of 500
    assert cfg.warmup_epochs == pytest.approx(179 * 100 / 500)   # 35.8: the first fifth
    assert cfg.lr == pytest.approx(0.0015)                        # 0.003 per 512 = 0.0015 per 256
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.schedule) == ("sgd", 0.9, 0.0, "step")
    assert (cfg.label_smoothing, cfg.drop_path_rate, cfg.layer_decay) == (0.0, 0.0, 1.0)
    assert cfg.img_size == 128
    assert (cfg.mode, cfg.seed) == ("partial", 3)                 # what the rule does not decide stays
    assert "179 epochs" in why and "[100, 200, 300, 400, 500]" in why and "resize 160" in why


def test_conversion_medium_dataset_smaller_batch_and_cap():
    cfg, why = hyperrule_config(FinetuneConfig(), n_train=50_000, image_side=32, batch_size=128, max_side=32)
    assert cfg.epochs == math.ceil(10_000 * 512 / 50_000) == 103  # 102.4 passes, rounded up
    assert cfg.milestones == pytest.approx([0.3, 0.6, 0.9])
    assert cfg.warmup_epochs == pytest.approx(103 * 500 / 10_000)
    assert cfg.batch_size == 128 and cfg.lr == pytest.approx(0.0015)
    assert cfg.lr * cfg.batch_size / 256 == pytest.approx(0.003 * 128 / 512)   # linear scaling per step
    assert cfg.img_size == 32 and "capped from 128" in why and "resize 40" in why


def test_tiny_dataset_batch_capped_and_scale_steps():
    cfg, _ = hyperrule_config(FinetuneConfig(), n_train=100, image_side=28)
    # a batch cannot hold more than the training set: 100 per step, lr scaled to it, same images seen
    assert cfg.batch_size == 100 and cfg.epochs == 500 * 512 // 100
    cfg, _ = hyperrule_config(FinetuneConfig(), n_train=1437, image_side=8, scale_steps=0.1)
    assert cfg.epochs == math.ceil(50 * 512 / 1437) == 18 and cfg.warmup_epochs == pytest.approx(3.6)
    assert cfg.milestones == pytest.approx([0.4, 0.6, 0.8])


def test_mixup_goes_to_the_config_field_when_there_is_one():
    @dataclass
    class WithMixup(FinetuneConfig):
        mixup: float = 0.0

    cfg, _ = hyperrule_config(WithMixup(), n_train=30_000, image_side=32)
    assert cfg.mixup == 0.1
    cfg, _ = hyperrule_config(WithMixup(mixup=0.8), n_train=1000, image_side=32)
    assert cfg.mixup == 0.0
    cfg, why = hyperrule_config(FinetuneConfig(), n_train=30_000, image_side=32)
    assert getattr(cfg, "mixup", None) == 0.1 if hasattr(FinetuneConfig(), "mixup") else "not applied" in why


def _bit_lr(step: int, supports: list[int], base_lr: float = 0.003):
    """BiT's rule as its code states it: linear warm-up, /10 after each middle support, stop at the last."""
    if step < supports[0]:
        return base_lr * step / supports[0]
    if step >= supports[-1]:
        return None
    return base_lr / 10 ** sum(s < step for s in supports[1:])


def test_keel_schedule_follows_bits_lr_when_steps_line_up():
    # 5120 images, batch 512: 10 steps per epoch, 50 epochs = BiT's 500 steps exactly
    cfg, _ = hyperrule_config(FinetuneConfig(), n_train=5120, image_side=32)
    spe = math.ceil(5120 / cfg.batch_size)
    total, warmup = cfg.epochs * spe, round(cfg.warmup_epochs * spe)
    assert (total, warmup) == (500, 100)
    peak = cfg.lr * cfg.batch_size / 256          # as finetune scales it
    for step in (0, 50, 99, 150, 199, 250, 299, 350, 399, 450, 499):
        ours = step_lr(step, total, peak, warmup, cfg.milestones)
        bit = _bit_lr(step, [100, 200, 300, 400, 500])
        # keel's warm-up reaches the peak one step earlier ((step+1)/W against step/W)
        expected = 0.003 * (step + 1) / 100 if step < 100 else bit
        assert ours == pytest.approx(expected, rel=1e-9), step


def test_finetune_runs_with_the_converted_config():
    train = build_dataset("digits", "train", 8, labeled=True).subset(torch.arange(200))
    test = build_dataset("digits", "test", 8, labeled=True).subset(torch.arange(50))
    cfg, _ = hyperrule_config(FinetuneConfig(device="cpu", eval_every=0, num_workers=0), 200, 8,
                              scale_steps=0.001, max_side=8)
    assert (cfg.epochs, cfg.batch_size, cfg.img_size) == (2, 200, 8)   # ceil(0.5 * 512 / 200) epochs of one batch
    torch.manual_seed(0)
    res = finetune(create_model("resnet10_cifar"), train, test, cfg, progress=False)
    assert res["steps"] == 2 and 0.0 <= res["final"]["top1"] <= 100.0


def test_other_recipes_augmentations_are_switched_off():
    @dataclass
    class WithExtras(FinetuneConfig):
        recipe: str = "deit"
        randaugment: str = "rand-m9-mstd0.5-inc1"
        cutmix: float = 1.0
        reprob: float = 0.25
        repeated_aug: int = 3
        model_ema: float = 0.999

    cfg, why = hyperrule_config(WithExtras(), n_train=30_000, image_side=32)
    assert (cfg.recipe, cfg.randaugment, cfg.cutmix, cfg.reprob, cfg.repeated_aug) == ("", "", 0.0, 0.0, 1)
    assert cfg.model_ema == 0.999                     # not an augmentation: the user's choice stays
    assert "switched off (not in BiT): cutmix, randaugment, recipe, repeated_aug, reprob" in why


def test_recipe_bit_chooses_from_the_data(capsys):
    from keel.evaluate.finetune import bit_recipe
    cfg = bit_recipe(FinetuneConfig(source="digits", recipe="bit", recipe_max_side=16), progress=True)
    # digits: 1,437 training images (< 20k) of 8x8 px (< 96x96): the small schedule, no MixUp,
    # crop 128 capped at 16; 500 steps of 512 images = ceil(500 * 512 / 1437) epochs
    assert (cfg.optimizer, cfg.schedule, cfg.weight_decay, cfg.recipe) == ("sgd", "step", 0.0, "")
    assert cfg.epochs == math.ceil(500 * 512 / 1437) and cfg.milestones == pytest.approx([0.4, 0.6, 0.8])
    assert cfg.img_size == 16 and cfg.mixup == 0.0
    assert "1437" in capsys.readouterr().out.replace(",", "")
