"""Typed run configuration: dataclasses, YAML in and out, and ``key=value`` overrides.

A run is fully described by one :class:`RunConfig`; the trainer saves the resolved config as
``config.yaml`` in every run directory so that a run can be read, repeated and resumed.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config value or key; the message is one line meant for the user."""


@dataclass
class DataConfig:
    source: str = "digits"          # built-in name (digits, fashion-mnist), an image folder, or
                                    # shards:PATH (keel shards output: a folder, a pattern of its tars, a URL)
    img_size: int = 32              # the side of training views and of evaluation's centre crop
    crop_from: str = "whole"        # training crops drawn over the "whole" image (aspect kept) or the
                                    # "center" square (keel 0.1); evaluation always resizes + centre-crops
    subset: int = 0                 # >0: train on a fixed random subset of this many images
    num_workers: int = 2            # decoding workers for image folders and shards (built-ins need none)
    shuffle_buffer: int = 4096      # shards: samples each process holds to shuffle its stream
    exclude: str = ""               # a file of images to leave out, one path a line (keel dedup's drop.txt;
                                    # absolute or relative to the folder; '#' lines ignored); pretraining
                                    # folders only


@dataclass
class ModelConfig:
    name: str = "resnet18_cifar"
    drop_path_rate: float = 0.0
    # ViT / DeiT only: the feature the backbone exports. "" keeps the model's own (the class
    # token); "avg" is the mean of the patch tokens: MAE never trains the class token directly,
    # and its features are far better averaged once trained (BENCHMARKS.md).
    global_pool: str = ""


@dataclass
class MethodConfig:
    """One flat section for every method; a method reads only its own keys (the README's table
    of methods lists them). ``None`` means the method's published default."""
    name: str = "simclr"            # simclr | swav | mae | simmim | dino | mocov3 | byol | simsiam | rotation
    temperature: float | None = None    # softmax temperature (simclr 0.2, mocov3 0.2, swav 0.1, dino student 0.1)
    proj_hidden_dim: int | None = None  # projector MLP width
    proj_dim: int | None = None         # projector output width
    pred_hidden_dim: int | None = None  # predictor MLP width (byol, simsiam, mocov3)
    momentum: float | None = None       # EMA start value, cosine to 1 (byol/dino 0.996, mocov3 0.99)
    # swav
    num_prototypes: int | None = None   # 3000 for ImageNet-size data
    sinkhorn_iters: int = 3
    sinkhorn_eps: float = 0.05
    freeze_prototypes_epochs: float = 1.0   # also DINO's last head layer (official freeze_last_layer)
    queue_length: int = 0               # features kept from earlier batches; 0 = no queue
    queue_start_epoch: int = 15
    prototype_bias: bool = False        # a learned offset per prototype score, as lightly's SwaVPrototypes
                                        # has; the official code has none (BENCHMARKS.md: SwAV vs lightly)
    # dino
    out_dim: int | None = None          # prototypes of the DINO head (65536 for ImageNet)
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    center_momentum: float = 0.9
    # mae / simmim
    mask_ratio: float | None = None     # mae 0.75, simmim 0.6
    mask_patch_size: int | None = None  # simmim mask unit in pixels (default: the backbone's stride 32)
    decoder_dim: int | None = None      # mae decoder width (default: the encoder's, at most 512)
    decoder_depth: int | None = None    # mae decoder blocks (default: scaled from the encoder, 1 to 8)
    decoder_heads: int | None = None    # mae decoder heads (default: head width 32 or just above)
    norm_pix_loss: bool = True


@dataclass
class AugConfig:
    """The two-view augmentation; see keel.data.views.ViewConfig for the meaning of each field."""
    scale_min: float = 0.2
    hflip: float = 0.5
    jitter_p: float = 0.8
    jitter: float = 0.4             # brightness, contrast and saturation strength
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0             # SimCLR uses 0.5 at 224 px; too destructive at 32 px
    # multi-crop (swav, dino): global crops use (scale_min, 1)
    local_crops: int | None = None  # small crops per image (None = the method's default, 6)
    local_size: int | None = None   # their side (None = 3/7 of img_size rounded up to 8: 96 at 224)
    local_scale_min: float = 0.05
    local_scale_max: float = 0.4


@dataclass
class TrainConfig:
    """The trainer's section, the same for every job; each job has its own defaults for some keys."""
    epochs: int = 10
    batch_size: int = 256           # global batch, split across processes
    optimizer: str = "adamw"        # adamw | lars | sgd
    lr: float | None = 1e-3         # base lr for a batch of 256, scaled linearly with batch size
    weight_decay: float | None = 1e-4   # never applied to norms, biases and tokens
    weight_decay_end: float | None = None  # cosine schedule of weight decay from weight_decay to this
                                           # over the run (DINO: 0.04 -> 0.4); None = constant
    momentum: float = 0.9           # sgd and lars
    schedule: str = "cosine"        # cosine (to min_lr) | step (x0.1 at each milestone)
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])  # step: fractions of training
    warmup_epochs: float = 1.0      # linear warm-up from 0 ...
    warmup_max_fraction: float = 0.25   # ... over at most this fraction of the run (short runs are
                                        # not all warm-up; the cap is printed when it applies)
    min_lr: float = 0.0
    layer_decay: float = 1.0        # layer-wise lr decay (BEiT/MAE): each block below the top gets this
                                    # factor less lr; heads and projectors keep the full lr; 1.0 = off
    clip_grad: float = 0.0          # max gradient norm; 0 = no clipping
    drop_last: bool = True          # True: n // batch_size full batches per epoch; False: ceil(n /
                                    # batch_size) near-equal batches (no image left out)
    repeated_aug: int = 1           # copies of each image per batch, each with its own views (DeiT: 3)
    model_ema: float = 0.0          # EMA decay per step (0: off); evaluated beside the model
    precision: str = "auto"         # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    parallel: str = "ddp"           # ddp (every process holds the whole model) | fsdp (FSDP2: parameters,
                                    # gradients and optimizer state sharded over the processes)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    auto_resume: bool = True        # a run directory holding a checkpoint of this same config continues from it
                                    # (torchrun restart, requeued job, restarted pod, the command run again)
    channels_last: bool = True      # only used for conv nets on GPU
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    seed: int = 0
    ckpt_every: int = 0             # steps between checkpoints; 0 = once per epoch
    log_every: int = 10             # steps between metric lines
    eval_every: int = 1             # epochs between evaluations on the test split (fine-tuning); 0 = at the end
    knn_every: int = 1              # epochs between kNN monitors (pretraining); 0 = off
    knn_subset: int = 5000          # monitor on at most this many train/test images
    out_dir: str = "runs"
    run_name: str = ""              # default: <method>-<model>-<data>-<time>
    max_steps: int = 0              # >0: stop after this many steps (for tests and dry runs)


@dataclass
class EvalConfig:
    knn_k: list[int] = field(default_factory=lambda: [20, 200])
    knn_t: float = 0.1
    linear_epochs: int = 100
    batch_size: int = 256


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Staged (coarse-to-fine) training: each entry overrides this config for one stage, e.g.
    # [{train: {epochs: 5}, data: {img_size: 16}}, {train: {epochs: 10}}]. Stage i starts from
    # stage i-1's weights and optimizer state. Empty = one stage, this config. See keel.engine.stages.
    stages: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------- fine-tuning
@dataclass
class FinetuneDataConfig(DataConfig):
    img_size: int = 0               # 0: the size the backbone was trained at (random:/timm: the model's own)
    test_source: str = ""           # a CSV source's test CSV; "" = every 5th row of source held out


@dataclass
class BackboneConfig:
    backbone: str = ""              # a run directory (pretraining or fine-tuning), a .safetensors file,
                                    # timm:<model>:<file> or random:<model> (keel.hub)
    drop_path_rate: float = 0.1     # stochastic depth of the last block, linear from 0 at the first


@dataclass
class FinetuneAugConfig:
    """Fine-tuning's views: a random resized crop and a flip per image, DeiT's extras optional."""
    scale_min: float = 0.64         # the crop keeps this fraction of the image area at least; 0.64 is
                                    # BiT-HyperRule's fine-tuning crop (resize 160, crop 128 = 64%)
    hflip: float = 0.5              # horizontal flip probability; the default assumes photos (a mirrored
                                    # image is the same class): 0 for digits, text, maps, charts
    randaugment: str = ""           # timm-style spec, e.g. rand-m9-mstd0.5-inc1 ("": off)
    reprob: float = 0.0             # random erasing probability per image
    mixup: float = 0.0              # Mixup's Beta alpha (0: off)
    cutmix: float = 0.0             # CutMix's Beta alpha (0: off)
    mix_switch_prob: float = 0.5    # both on: CutMix with this probability per batch, else Mixup


@dataclass
class ClassifyConfig:
    mode: str = "full"              # full | partial (last partial_blocks blocks + head) | linear (head)
    partial_blocks: int = 2         # partial: blocks that train, counted from the last (0: final norm + head)
    label_smoothing: float = 0.1
    multilabel_loss: str = "bce"    # multi-label CSV: bce | asl (asymmetric loss)
    threshold: float = 0.5          # multi-label CSV: sigmoid threshold of the F1 scores
    fusion: str = "concat"          # model.backbone a keel clip run, data.source labeled image-text pairs:
                                    # the fusion head kept, concat (late fusion, MLP) | attention


@dataclass
class DistillConfig:
    teacher: str = ""               # classifier to distill from: a keel finetune run, timm:<model>:<file>, random:<model>
    kind: str = "none"              # none | hard (the teacher's argmax) | soft (KL at tau)
    tau: float = 1.0                # soft distillation temperature
    alpha: float = 0.5              # loss = (1 - alpha) * base + alpha * distillation


@dataclass
class RecipeConfig:
    name: str = ""                  # "" | deit | bit-upstream | bit (keel.recipes)
    max_side: int = 0               # bit: cap the HyperRule's resolution for small machines; 0 = none
    scale: float = 1.0              # bit: multiply BiT-HyperRule's step counts (0.1: a tenth of the run)
    lr_search: list[float] = field(default_factory=list)  # lrs to try on held-out training images first; [] = off
    lr_search_holdout: float = 0.2  # lr_search: fraction of each class's training images held out


def _finetune_train() -> TrainConfig:
    # lr and weight decay None: the optimizer's own (keel.recipes.DEFAULT_LR); every image is used;
    # a small batch so that short runs on small data take enough steps (keel.recipes.supervised)
    return TrainConfig(epochs=50, batch_size=32, lr=None, weight_decay=None, warmup_epochs=5.0,
                       drop_last=False, log_every=50)


@dataclass
class FinetuneConfig:
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: BackboneConfig = field(default_factory=BackboneConfig)
    task: ClassifyConfig = field(default_factory=ClassifyConfig)
    aug: FinetuneAugConfig = field(default_factory=FinetuneAugConfig)
    train: TrainConfig = field(default_factory=_finetune_train)
    distill: DistillConfig = field(default_factory=DistillConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


# ---------------------------------------------------------------- evaluation
@dataclass
class EvalDataConfig:
    source: list[str] = field(default_factory=lambda: ["digits"])  # built-in names or labeled folders (suite: several)
    img_size: int = 0               # 0: each backbone's own size (the size it was trained at)


@dataclass
class EvalModelConfig:
    backbone: list[str] = field(default_factory=list)  # run dirs, .safetensors, timm:<model>:<file>,
                                                       # random:<model> (suite: several)


@dataclass
class EvalProtocolConfig(EvalConfig):
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])   # fewshot: images per class
    draws: int = 3                  # fewshot: random draws per shot count
    fewshot_finetune: bool = False  # fewshot, suite: also fine-tune on each draw (slow)
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear", "fewshot", "finetune", "robustness"])
    finetune_epochs: int = 10       # suite: epochs of the short fine-tuning
    hyperrule: bool = False         # suite: BiT-HyperRule's schedule and fixed lr instead
    hyperrule_scale: float = 1.0    # suite: multiply BiT-HyperRule's step counts
    severity: int = 3               # suite: corruption severity 1..5 for robustness
    label_fractions: list[float] = field(default_factory=list)  # suite: also train on these fractions of the labels
    templates: str = ""             # zeroshot: a file of prompt templates, one a line with {} for the class
                                    # ("" = keel.evaluate.zeroshot.DEFAULT_TEMPLATES)
    classes: str = ""               # zeroshot: a file of class names, one a line, in the data's class order
                                    # ("" = the data's own: folder names, built-ins' names)
    out: str = ""                   # suite: folder for the report ("" = runs/suite-<time>)
    json: str = ""                  # also write the results as JSON to this file


@dataclass
class EvalRunConfig:
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    seed: int = 0                   # few-shot draws, label fractions, fine-tuning, noise, linear probe


@dataclass
class EvalJobConfig:
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    eval: EvalProtocolConfig = field(default_factory=EvalProtocolConfig)
    run: EvalRunConfig = field(default_factory=EvalRunConfig)


# The flat keys of keel 0.1's FinetuneConfig, still read (with a deprecation message) this release.
FLAT_FINETUNE_KEYS = {
    "backbone": "model.backbone", "drop_path_rate": "model.drop_path_rate",
    "source": "data.source", "test_source": "data.test_source", "img_size": "data.img_size",
    "num_workers": "data.num_workers",
    "mode": "task.mode", "partial_blocks": "task.partial_blocks", "label_smoothing": "task.label_smoothing",
    "multilabel_loss": "task.multilabel_loss", "threshold": "task.threshold",
    **{k: f"train.{k}" for k in ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "schedule",
                                 "milestones", "warmup_epochs", "layer_decay", "clip_grad", "eval_every", "seed",
                                 "device", "precision", "out_dir", "model_ema", "repeated_aug")},
    **{k: f"aug.{k}" for k in ("randaugment", "mixup", "cutmix", "mix_switch_prob", "reprob")},
    "teacher": "distill.teacher", "distill": "distill.kind", "distill_tau": "distill.tau",
    "distill_alpha": "distill.alpha",
    "recipe": "recipe.name", "recipe_max_side": "recipe.max_side", "lr_search": "recipe.lr_search",
    "lr_search_holdout": "recipe.lr_search_holdout",
}


def unflatten_finetune(data: dict, warn=None) -> dict:
    """``data`` with keel 0.1's flat fine-tuning keys moved to their sections; ``warn`` gets one
    line naming the keys moved. A ``distill`` key holding a string is the old flat one."""
    moved, out = [], {}
    for key, value in data.items():
        flat = key in FLAT_FINETUNE_KEYS and not (key in ("distill", "recipe") and isinstance(value, dict))
        if flat:
            section, name = FLAT_FINETUNE_KEYS[key].split(".")
            out = merge(out, {section: {name: value}})
            moved.append(f"{key} -> {FLAT_FINETUNE_KEYS[key]}")
        else:
            out = merge(out, {key: value})
    if moved and warn is not None:
        warn("deprecated flat keys (they stop working in the next release): " + ", ".join(moved))
    return out


def override(cfg, values: dict):
    """A copy of ``cfg`` with ``{"section.key": value}`` set, checked like a config file."""
    nested: dict = {}
    for key, value in values.items():
        node = nested
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return from_dict(type(cfg), merge(to_dict(cfg), nested))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value, tp, key: str):
    """Turn a YAML value into the field's declared type, or fail with a clear message."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors (typos must not pass)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict:
    """``["train.epochs=3", "model.name=vit_tiny"]`` -> nested dict with YAML-typed values."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.epochs=5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with '{'.'.join(parts[:i + 1])}' set to a value")
        node[parts[-1]] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | dict | None = None, overrides: list[str] | None = None,
                cls=RunConfig, defaults: dict | None = None):
    """Defaults, then ``defaults`` (a sub-command's own), then the YAML file (or the same mapping
    given as a dict), then overrides."""
    data = to_dict(cls())
    if defaults:
        data = merge(data, defaults)
    if isinstance(path, dict):
        data = merge(data, _sections(path, cls))
    elif path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (data:, train:, ...), "
                              f"got {type(loaded).__name__}")
        data = merge(data, _sections(loaded, cls))
    if overrides:
        data = merge(data, _sections(parse_overrides(overrides), cls))
    return from_dict(cls, data)


def _sections(data: dict, cls) -> dict:
    if cls is not FinetuneConfig:
        return data
    return unflatten_finetune(data, warn=lambda m: print(f"keel: {m}", file=sys.stderr))


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
