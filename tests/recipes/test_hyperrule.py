"""keel.recipes.hyperrule: BiT-HyperRule's table at its boundaries, and its conversion into a
FinetuneConfig checked by hand and against BiT's own lr rule."""
from __future__ import annotations

import math

import pytest
import torch

from keel.config import FinetuneConfig, override
from keel.data.sources import build_dataset
from keel.engine.optim import step_lr
from keel.jobs.finetune import finetune
from keel.models.registry import create_model
from keel.recipes.hyperrule import hyperrule, hyperrule_config
from keel.recipes.supervised import apply_recipe, bit_recipe


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
    base = override(FinetuneConfig(), {"task.mode": "partial", "train.seed": 3})
    cfg, why = hyperrule_config(base, n_train=1437, image_side=8)
    t = cfg.train
    # 500 steps x 512 images / 1437 = 178.15 passes -> 179 epochs; 512 images per batch
    assert t.epochs == 179 and t.batch_size == 512
    assert t.milestones == pytest.approx([0.4, 0.6, 0.8])      # 200, 300, 400 of 500
    assert t.warmup_epochs == pytest.approx(179 * 100 / 500)   # 35.8: the first fifth
    assert t.lr == pytest.approx(0.0015)                        # 0.003 per 512 = 0.0015 per 256
    assert (t.optimizer, t.momentum, t.weight_decay, t.schedule) == ("sgd", 0.9, 0.0, "step")
    assert (cfg.task.label_smoothing, cfg.model.drop_path_rate, t.layer_decay) == (0.0, 0.0, 1.0)
    assert cfg.data.img_size == 128
    assert (cfg.task.mode, t.seed) == ("partial", 3)           # what the rule does not decide stays
    assert "179 epochs" in why and "[100, 200, 300, 400, 500]" in why and "resize 160" in why


def test_conversion_medium_dataset_smaller_batch_and_cap():
    cfg, why = hyperrule_config(FinetuneConfig(), n_train=50_000, image_side=32, batch_size=128, max_side=32)
    t = cfg.train
    assert t.epochs == math.ceil(10_000 * 512 / 50_000) == 103  # 102.4 passes, rounded up
    assert t.milestones == pytest.approx([0.3, 0.6, 0.9])
    assert t.warmup_epochs == pytest.approx(103 * 500 / 10_000)
    assert t.batch_size == 128 and t.lr == pytest.approx(0.0015)
    assert t.lr * t.batch_size / 256 == pytest.approx(0.003 * 128 / 512)   # linear scaling per step
    assert cfg.data.img_size == 32 and "capped from 128" in why and "resize 40" in why


def test_tiny_dataset_batch_capped_and_scale_steps():
    cfg, _ = hyperrule_config(FinetuneConfig(), n_train=100, image_side=28)
    # a batch cannot hold more than the training set: 100 per step, lr scaled to it, same images seen
    assert cfg.train.batch_size == 100 and cfg.train.epochs == 500 * 512 // 100
    cfg, _ = hyperrule_config(FinetuneConfig(), n_train=1437, image_side=8, scale_steps=0.1)
    assert cfg.train.epochs == math.ceil(50 * 512 / 1437) == 18 and cfg.train.warmup_epochs == pytest.approx(3.6)
    assert cfg.train.milestones == pytest.approx([0.4, 0.6, 0.8])


def test_mixup_goes_to_the_config_field():
    # the sectioned config always has aug.mixup (keel 0.1's flat one could lack it: "not applied")
    cfg, why = hyperrule_config(FinetuneConfig(), n_train=30_000, image_side=32)
    assert cfg.aug.mixup == 0.1 and "alpha 0.1 -> aug.mixup" in why
    cfg, _ = hyperrule_config(override(FinetuneConfig(), {"aug.mixup": 0.8}), n_train=1000, image_side=32)
    assert cfg.aug.mixup == 0.0


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
    t = cfg.train
    spe = math.ceil(5120 / t.batch_size)
    total, warmup = t.epochs * spe, round(t.warmup_epochs * spe)
    assert (total, warmup) == (500, 100)
    peak = t.lr * t.batch_size / 256          # as the trainer scales it
    for step in (0, 50, 99, 150, 199, 250, 299, 350, 399, 450, 499):
        ours = step_lr(step, total, peak, warmup, t.milestones)
        bit = _bit_lr(step, [100, 200, 300, 400, 500])
        # keel's warm-up reaches the peak one step earlier ((step+1)/W against step/W)
        expected = 0.003 * (step + 1) / 100 if step < 100 else bit
        assert ours == pytest.approx(expected, rel=1e-9), step


def test_finetune_runs_with_the_converted_config():
    train = build_dataset("digits", "train", 8, labeled=True).subset(torch.arange(200))
    test = build_dataset("digits", "test", 8, labeled=True).subset(torch.arange(50))
    base = override(FinetuneConfig(), {"train.device": "cpu", "train.eval_every": 0, "data.num_workers": 0})
    cfg, _ = hyperrule_config(base, 200, 8, scale_steps=0.001, max_side=8)
    # ceil(0.5 * 512 / 200) epochs of one batch
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.img_size) == (2, 200, 8)
    torch.manual_seed(0)
    res = finetune(create_model("resnet10_cifar"), train, test, cfg, progress=False)
    assert res["steps"] == 2 and 0.0 <= res["final"]["top1"] <= 100.0


def _deit_with_ema():
    return apply_recipe(override(FinetuneConfig(), {"recipe.name": "deit", "train.model_ema": 0.999}), verbose=False)


def test_other_recipes_augmentations_are_switched_off():
    base = _deit_with_ema()
    assert (base.aug.randaugment, base.aug.cutmix, base.aug.reprob, base.train.repeated_aug) == \
        ("rand-m9-mstd0.5-inc1", 1.0, 0.25, 3)
    cfg, why = hyperrule_config(base, n_train=30_000, image_side=32)
    assert (cfg.aug.randaugment, cfg.aug.cutmix, cfg.aug.reprob, cfg.train.repeated_aug) == ("", 0.0, 0.0, 1)
    assert cfg.train.model_ema == 0.999                     # not an augmentation: the user's choice stays
    assert "switched off (not in BiT): aug.cutmix, aug.randaugment, aug.reprob, train.repeated_aug" in why


def test_switched_off_augmentations_stay_off_in_finetune():
    cfg, _ = hyperrule_config(_deit_with_ema(), n_train=30_000, image_side=32)
    used = apply_recipe(cfg, verbose=False)                 # what finetune() does first with a config
    assert (used.aug.randaugment, used.aug.cutmix, used.aug.reprob, used.train.repeated_aug) == ("", 0.0, 0.0, 1)


def test_recipe_bit_chooses_from_the_data(capsys):
    train = build_dataset("digits", "train", 8, labeled=True)
    base = override(FinetuneConfig(), {"data.source": "digits", "recipe.name": "bit", "recipe.max_side": 16})
    cfg = bit_recipe(base, train, progress=True)
    t = cfg.train
    # digits: 1,437 training images (< 20k) of 8x8 px (< 96x96): the small schedule, no MixUp,
    # crop 128 capped at 16; 500 steps of 512 images = ceil(500 * 512 / 1437) epochs
    assert (t.optimizer, t.schedule, t.weight_decay) == ("sgd", "step", 0.0)
    # the name stays (the run reports its recipe); finetune's apply_recipe leaves a bit config alone
    assert cfg.recipe.name == "bit" and apply_recipe(cfg, verbose=False) == cfg
    assert t.epochs == math.ceil(500 * 512 / 1437) and t.milestones == pytest.approx([0.4, 0.6, 0.8])
    assert cfg.data.img_size == 16 and cfg.aug.mixup == 0.0
    assert "1437" in capsys.readouterr().out.replace(",", "")


def test_bit_recipe_keeps_what_the_user_set_says_so_and_scales(capsys):
    from keel.data.sources import labeled_splits
    from keel.recipes.supervised import bit_recipe
    train, _ = labeled_splits("digits", 8)
    base = override(FinetuneConfig(), {"data.source": "digits", "recipe.name": "bit", "train.lr": 0.0015})
    full = bit_recipe(base, train, progress=False)
    assert full.train.epochs == math.ceil(500 * 512 / len(train))          # BiT's 500 steps of 512 images
    tenth = bit_recipe(override(base, {"recipe.scale": 0.1}), train, progress=False)
    assert tenth.train.epochs == math.ceil(50 * 512 / len(train)) and tenth.train.milestones == full.train.milestones
    mine = bit_recipe(override(base, {"train.epochs": 2, "train.batch_size": 64, "data.img_size": 16}), train)
    out = capsys.readouterr().out
    assert (mine.train.epochs, mine.train.batch_size, mine.data.img_size) == (2, 64, 16)
    assert "kept (set by you): train.epochs=2 (the rule's: 179), train.batch_size=64" in out
    assert mine.train.optimizer == "sgd" and mine.train.milestones == full.train.milestones   # the rest is the rule's
