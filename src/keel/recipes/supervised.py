"""Supervised recipes: they choose a fine-tuning config; the one trainer runs it.

* ``deit`` (Touvron et al. 2021, its main.py): AdamW, lr 5e-4 per 512 images (keel's lr is per
  256: 2.5e-4), weight decay 0.05, cosine, 5 warm-up epochs, label smoothing 0.1, RandAugment m9
  mstd0.5 (increasing ops), Mixup 0.8, CutMix 1.0 (switch 0.5), random erasing 0.25, drop path
  0.1, repeated augmentation x3. Left to the user: the epochs (DeiT: 300), the model EMA (off).
  Kept from keel's fine-tuning: the crop (area 0.64-1, DeiT 0.08-1), the warm-up from 0 and the
  cosine to 0 (DeiT: from 1e-6, to 1e-5).
* ``bit-upstream`` (Kolesnikov et al. 2020): training a GN+WS ResNet-v2 from scratch on the big
  labeled set, SGD momentum 0.9, lr 0.03 per 256, weight decay 1e-4, x0.1 at 30, 60 and 80 of 90
  epochs; no label smoothing, no drop-path. Left to the user: the epochs (BiT: 90) and the warm-up.
* ``bit``: BiT-HyperRule (:mod:`keel.recipes.hyperrule`) picks schedule, resolution and MixUp from
  the data, and the lr is picked on held-out training images (:mod:`keel.recipes.lr_search`).

A recipe fills the keys the user left at their defaults and keeps, and prints, the others.
"""
from __future__ import annotations

from keel.config import ConfigError, FinetuneConfig, override
from keel.recipes.hyperrule import hyperrule_config
from keel.recipes.lr_search import BIT_LR_GRID

# Per optimizer when the config leaves them unset. AdamW: 4e-3 per 256 images, i.e. 5e-4 at
# fine-tuning's default batch of 32 (MAE's ViT-B fine-tuning lr is 5e-4 per 256 with layer decay
# 0.65; keel's default has none). The small batch is what makes short runs on small data learn:
# at the same 5e-4 per step, batch 32 takes four times the steps of batch 128 (digits, random
# init, 5 epochs: 63.6 against 46.7; a 480-image folder: 96.7 against 50.8; 4e-3 per 256 at batch
# 128: 54.2 on the folder; benchmarks/finetune_defaults.py). Weight decay 0.05 (MAE). SGD:
# momentum 0.9 and no weight decay as BiT fine-tunes, lr 0.01 per 256.
DEFAULT_LR = {"adamw": 4e-3, "sgd": 0.01, "lars": 0.01}
DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 0.0, "lars": 0.0}

RECIPES: dict[str, dict] = {
    "bit-upstream": {"train.optimizer": "sgd", "train.lr": 0.03, "train.weight_decay": 1e-4, "train.momentum": 0.9,
                     "train.schedule": "step", "train.milestones": [30 / 90, 60 / 90, 80 / 90],
                     "task.label_smoothing": 0.0, "model.drop_path_rate": 0.0},
    "deit": {"train.optimizer": "adamw", "train.lr": 2.5e-4, "train.weight_decay": 0.05, "train.schedule": "cosine",
             "train.warmup_epochs": 5.0, "task.label_smoothing": 0.1, "aug.randaugment": "rand-m9-mstd0.5-inc1",
             "aug.mixup": 0.8, "aug.cutmix": 1.0, "aug.mix_switch_prob": 0.5, "aug.reprob": 0.25,
             "model.drop_path_rate": 0.1, "train.repeated_aug": 3},
}
NAMES = ("", "bit", *RECIPES)


def _get(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def apply_recipe(cfg: FinetuneConfig, verbose: bool = True) -> FinetuneConfig:
    """``cfg`` with its recipe's values (:data:`RECIPES`) in every key the user left at its
    default; a key set to anything else is kept, and so are the lr and weight decay when the
    optimizer is not the recipe's (the recipe's values are for its optimizer). Returns a new config;
    applying it twice changes nothing more. With ``verbose`` it prints what it set and kept."""
    name = cfg.recipe.name
    if name not in RECIPES:
        if name not in NAMES:
            raise ConfigError(f"recipe.name must be one of '' | {' | '.join(NAMES[1:])}, got {name!r}")
        return cfg
    recipe, defaults = RECIPES[name], FinetuneConfig()
    # the optimizer the run will use: the user's when set, else the recipe's
    own_opt = cfg.train.optimizer
    optimizer = own_opt if own_opt != defaults.train.optimizer else recipe.get("train.optimizer", own_opt)
    other_optimizer = optimizer != recipe.get("train.optimizer", optimizer)
    changes, same, kept = {}, [], []
    for key, value in recipe.items():
        current = _get(cfg, key)
        if current == value:
            same.append(f"{key}={value!r}")
        elif current == _get(defaults, key) and not (other_optimizer and key in ("train.lr", "train.weight_decay")):
            changes[key] = value
        else:
            kept.append(f"{key}={current!r}")
    if verbose:
        lines = [f"recipe {name}: set " + (", ".join(f"{k}={v!r}" for k, v in changes.items()) or "nothing")]
        if same:
            lines.append("  already the recipe's: " + ", ".join(same))
        if kept:
            lines.append("  kept (set by you): " + ", ".join(kept))
        print("\n".join(lines))
    return override(cfg, changes)


def resolve_defaults(cfg: FinetuneConfig) -> FinetuneConfig:
    """The optimizer's own lr and weight decay where the config leaves them None, so that the
    saved config.yaml holds the values used."""
    opt = cfg.train.optimizer
    values = {}
    if cfg.train.lr is None and not cfg.recipe.lr_search:
        values["train.lr"] = DEFAULT_LR[opt]
    if cfg.train.weight_decay is None:
        values["train.weight_decay"] = DEFAULT_WEIGHT_DECAY[opt]
    return override(cfg, values) if values else cfg


_NATIVE_SIDE = {"digits": 8, "fashion-mnist": 28}     # the built-ins' own image side, HyperRule's input


def bit_recipe(cfg: FinetuneConfig, train_ds, progress: bool = True, size_given: bool = True) -> FinetuneConfig:
    """``recipe.name=bit``: BiT-HyperRule's choices from the training-set size and the images' own
    side (the first image's, for a folder or a CSV), printed with the reasons. The lr: the user's
    when set; else ``recipe.lr_search`` when set; else :data:`BIT_LR_GRID` (per 512, BiT's unit),
    searched on held-out training images. The epochs, batch size and image size the user set
    (``size_given``: the image size was the user's, not the backbone's own) are kept, and said."""
    from PIL import Image
    side = _NATIVE_SIDE.get(cfg.data.source)
    if side is None and getattr(train_ds, "paths", None):
        with Image.open(train_ds.paths[0]) as im:
            side = im.size[::-1]
    user_lr = cfg.train.lr
    rule, text = hyperrule_config(cfg, len(train_ds), side or cfg.data.img_size,
                                  max_side=cfg.recipe.max_side or None, scale_steps=cfg.recipe.scale)
    # what the user set wins over the rule, and is said: the schedule keeps its shape (milestones
    # and warm-up are fractions of the run), the lr stays per 256 images
    defaults = FinetuneConfig()
    kept = {key: _get(cfg, key) for key in ("train.epochs", "train.batch_size", "data.img_size")
            if _get(cfg, key) != _get(defaults, key) and (size_given or key != "data.img_size")}
    out = override(rule, kept) if kept else rule
    if kept:
        text += ("\n  kept (set by you): " + ", ".join(f"{k}={v} (the rule's: {_get(rule, k)})" for k, v in kept.items())
                 + "; recipe.scale=0.1 shortens the rule's own schedule instead")
    if user_lr is not None:
        out = override(out, {"train.lr": user_lr})
        text += f"\n  lr: {user_lr:g} per 256, yours (train.lr=0.0015 is BiT's own 0.003 per 512)"
    elif cfg.recipe.lr_search:
        out = override(out, {"train.lr": None})
        text += f"\n  lr: chosen from your recipe.lr_search {cfg.recipe.lr_search} on held-out training images"
    else:
        out = override(out, {"train.lr": None, "recipe.lr_search": [v * 256 / 512 for v in BIT_LR_GRID]})
        text += (f"\n  lr: instead of BiT's fixed 0.003, chosen from {', '.join(f'{v:g}' for v in BIT_LR_GRID)} "
                 f"per 512 on {cfg.recipe.lr_search_holdout:g} of the training images held out (keel's one change "
                 "to the rule, keel.recipes.lr_search; train.lr=0.0015 per 256 keeps BiT's value)")
    if progress:
        print(text)
    return out
