"""One place that turns a backbone spec (the string a user writes in a config or on the command
line) into a model, for every command that takes one: evaluation, fine-tuning, distillation.

A spec is one of

* a pretraining run directory (``backbone.safetensors`` + ``card.json``; a staged run's top
  directory holds the last stage's), or such a ``.safetensors`` file with ``card.json`` beside it;
* a fine-tune run directory (``classifier.safetensors`` + ``config.yaml``) or one of its
  ``classifier*.safetensors`` files: the backbone is the classifier's, the head is dropped;
* ``timm:<model>:<file>``: a timm state dict (``.safetensors``, or ``.pth``/``.pt`` read with
  ``weights_only``) of keel model ``<model>`` or of its timm name, converted with
  :func:`keel.convert.from_timm`;
* ``random:<model>``: freshly initialised from ``seed``, the from-scratch baseline.

The image size is ``img_size`` when given, else the size the weights were trained at (the card's
``model_kwargs.img_size``, a fine-tune run's ``img_size``), else the model's own default
(``random:``, ``timm:``). A ViT built at another size than it was trained at gets its position
table resampled; any other size-dependent weight makes a one-line error naming the size to use.

Every error is one line that starts with the argument it is about (``model.backbone``,
``distill.teacher``...) and the spec, so a user knows which setting to fix.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from keel.convert import from_timm
from keel.engine.checkpoint import sha256
from keel.models.classifier import Classifier, DistilledHead
from keel.models.layers.position import interpolate_pos_embed
from keel.models.registry import create_model, family_of, list_models
from keel.models.stats import default_img_size as config_size

__all__ = ["resolve_backbone", "resolve_classifier", "default_img_size", "model_of"]

# A fine-tune run may start from another fine-tune run (BiT's upstream -> downstream): the chain
# is followed through config.yaml files, and a chain this long can only be a loop.
_MAX_CHAIN = 16


@dataclass
class _Source:
    """What a spec points at, read without loading any weights."""
    kind: str                       # "random" | "timm" | "backbone" | "finetune"
    name: str                       # keel model name
    kwargs: dict = field(default_factory=dict)  # create_model keywords other than img_size
    trained_at: int = 224           # the side the weights were made for
    weights: Path | None = None
    sha256: str = ""


def resolve_backbone(spec: str, img_size: int | None = None, seed: int = 0,
                     arg: str = "model.backbone") -> tuple[nn.Module, int]:
    """(head-less backbone, image side it was built for) from ``spec`` (see the module docstring)."""
    src = _source(spec, arg)
    size = img_size or src.trained_at
    if src.kind == "random":
        return _seeded(src.name, seed, img_size=size), size
    model = _build(src, size)
    sd = _state_dict(src, spec, arg)
    if src.kind == "finetune":
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
    _load(model, sd, src, size, spec, arg)
    return model, size


def resolve_classifier(spec: str, num_classes: int, img_size: int | None = None, seed: int = 0,
                       arg: str = "distill.teacher") -> nn.Module:
    """A frozen classifier in eval mode whose forward gives (B, ``num_classes``) logits: a
    fine-tune run rebuilt with its head, ``timm:`` with its head, or ``random:`` with a fresh
    ``num_classes`` head. A pretraining run has no head and is refused."""
    src = _source(spec, arg)
    size = img_size or src.trained_at
    if src.kind == "backbone":
        raise ValueError(f"{arg}: '{spec}' is a backbone without a classifier head: fine-tune it first "
                         "(keel finetune) and give that run directory")
    if src.kind == "random":
        model = _seeded(src.name, seed, num_classes=num_classes, img_size=size)
    else:
        sd = _state_dict(src, spec, arg)
        if src.kind == "timm":
            if "head.weight" not in sd or sd["head.weight"].dim() != 2:
                raise ValueError(f"{arg}: '{spec}' has no classifier head (head.weight): "
                                 "a classifier must output class logits")
            model = _build(src, size, num_classes=sd["head.weight"].shape[0])
            _load(model, sd, src, size, spec, arg)
        else:
            backbone = _build(src, size)

            def linear(prefix: str) -> nn.Linear:
                w = sd[prefix + ".weight"]
                return nn.Linear(w.shape[1], w.shape[0], bias=prefix + ".bias" in sd)

            if "head.cls.weight" in sd and "head.dist.weight" in sd:
                head = DistilledHead(linear("head.cls"), linear("head.dist"))
            elif "head.weight" in sd and sd["head.weight"].dim() == 2:
                head = linear("head")
            else:
                raise ValueError(f"{arg}: '{spec}' holds no linear classifier head (head.weight)")
            try:
                model = Classifier(backbone, head, feature_norm="feature_norm.running_mean" in sd)
            except ValueError as e:
                raise ValueError(f"{arg}: '{spec}': {e}") from None
            _load(model, sd, src, size, spec, arg)
    head = getattr(model, "head", None)
    head = getattr(head, "cls", head)
    classes = getattr(head, "out_features", None)
    if classes != num_classes:
        raise ValueError(f"{arg}: '{spec}' predicts {classes} classes, the data has {num_classes}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def default_img_size(spec: str, arg: str = "model.backbone") -> int:
    """The side :func:`resolve_backbone` builds ``spec`` at without ``img_size``; reads cards and
    configs only, no weights."""
    return _source(spec, arg).trained_at


def model_of(spec: str, arg: str = "model.backbone") -> tuple[str, dict]:
    """The keel model name and its ``create_model`` keywords other than ``img_size`` (what a card
    records) of ``spec``; reads cards and configs only, no weights."""
    src = _source(spec, arg)
    return src.name, dict(src.kwargs)


# ---------------------------------------------------------------------------------- specs
def _source(spec: str, arg: str, chain: int = 0) -> _Source:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{arg}: no backbone given (a run directory, a .safetensors file, "
                         "timm:<model>:<file> or random:<model>)")
    if spec.startswith("random:"):
        name = _keel_name(spec[len("random:"):], spec, arg)
        return _Source("random", name, trained_at=_own_size(name))
    if spec.startswith("timm:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ValueError(f"{arg}: '{spec}': write timm:<model name>:<path to its state dict>")
        name = _keel_name(parts[1], spec, arg)
        weights = Path(parts[2]).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"{arg}: no such file '{parts[2]}' (in '{spec}')")
        return _Source("timm", name, trained_at=_own_size(name), weights=weights)

    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{arg}: no such file or directory '{spec}'")
    if p.is_dir() and (p / "classifier.safetensors").is_file():
        return _finetune_source(p / "classifier.safetensors", spec, arg, chain)
    if p.is_dir() and (p / "backbone.safetensors").is_file():
        return _card_source(p / "backbone.safetensors", p / "card.json", spec, arg)
    if p.is_file() and p.suffix == ".safetensors":
        if p.name.startswith("classifier") and p.with_name("config.yaml").is_file():
            return _finetune_source(p, spec, arg, chain)
        if p.name.startswith("classifier") and not p.with_name("card.json").is_file():
            raise FileNotFoundError(f"{arg}: '{spec}' has no config.yaml beside it, so the classifier's "
                                    "architecture is unknown")
        return _card_source(p, p.with_name("card.json"), spec, arg)
    if p.is_file() and p.name == "card.json":
        return _card_source(p.with_name("backbone.safetensors"), p, spec, arg)
    raise ValueError(f"{arg}: '{spec}' is neither a keel run directory (backbone.safetensors or "
                     "classifier.safetensors) nor a .safetensors file, timm:<model>:<file> or random:<model>")


def _card_source(weights: Path, card_path: Path, spec: str, arg: str) -> _Source:
    if not weights.is_file():
        raise FileNotFoundError(f"{arg}: '{spec}' has no backbone.safetensors beside its card.json")
    if not card_path.is_file():
        raise FileNotFoundError(f"{arg}: '{spec}' has no card.json beside it, so the model it belongs to is unknown")
    try:
        card = json.loads(card_path.read_text())
        name, kwargs = card["model"], dict(card.get("model_kwargs") or {})
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{arg}: '{card_path}' is not a keel card ({e.__class__.__name__}: {e})") from None
    name = _keel_name(name, spec, arg)
    # Older cards kept the size under data only; a card with neither was made at the model's default.
    trained = kwargs.pop("img_size", None) or (card.get("data") or {}).get("img_size") or _own_size(name, kwargs)
    return _Source("backbone", name, kwargs, int(trained), weights, card.get("sha256") or "")


def _finetune_source(weights: Path, spec: str, arg: str, chain: int) -> _Source:
    import yaml

    config = weights.with_name("config.yaml")
    if not config.is_file():
        raise FileNotFoundError(f"{arg}: '{spec}' has no config.yaml beside it, so the classifier's "
                                "architecture is unknown")
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{arg}: '{config}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{arg}: '{config}' is not a fine-tune config (not a mapping)")
    upstream = _setting(cfg, "model", "backbone")
    if not upstream:
        raise ValueError(f"{arg}: '{config}' names no backbone (the run came from finetune() with a module), "
                         "so the classifier's architecture is unknown")
    if chain >= _MAX_CHAIN:
        raise ValueError(f"{arg}: '{spec}': fine-tune runs name each other's backbones in a loop")
    try:
        up = _source(str(upstream), arg, chain + 1)
    except (FileNotFoundError, ValueError) as e:
        # the inner message already starts with "arg: "; drop it so the line stays readable
        raise ValueError(f"{arg}: cannot rebuild the backbone of '{spec}' from its config's "
                         f"backbone={upstream!r}: {str(e).removeprefix(arg + ': ')}") from None
    trained = _setting(cfg, "data", "img_size") or up.trained_at
    return _Source("finetune", up.name, up.kwargs, int(trained), weights)


def _setting(cfg: dict, section: str, key: str):
    """``cfg[section][key]`` (sectioned config.yaml) or ``cfg[key]`` (flat, as written before)."""
    inner = cfg.get(section)
    if isinstance(inner, dict) and key in inner:
        return inner[key]
    return cfg.get(key)


def _keel_name(name: str, spec: str, arg: str) -> str:
    """A keel model name, or the keel name of a timm model name (a family's TIMM_NAMES)."""
    import importlib

    models = list_models()
    if name in models:
        return name
    for n in models:
        if getattr(importlib.import_module(family_of(n)), "TIMM_NAMES", {}).get(n) == name:
            return n
    raise ValueError(f"{arg}: '{spec}': unknown model '{name}' (`keel models` lists them)")


def _own_size(name: str, kwargs: dict | None = None) -> int:
    # on the meta device: no memory, no initialisation, no draw from the global RNG
    with torch.device("meta"):
        return config_size(create_model(name, **(kwargs or {})))


# ---------------------------------------------------------------------------------- weights
def _build(src: _Source, size: int, num_classes: int = 0) -> nn.Module:
    # every weight is overwritten by the file, so the initialisation must not consume the
    # caller's random stream
    with torch.random.fork_rng(devices=[]):
        return create_model(src.name, num_classes=num_classes, **dict(src.kwargs, img_size=size))


def _seeded(name: str, seed: int, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, **kwargs)


def _state_dict(src: _Source, spec: str, arg: str) -> dict[str, torch.Tensor]:
    """The weights of ``src`` in keel's names: backbone exports and timm files as the model's own
    keys, fine-tune runs as the classifier's (``backbone.*``, ``head.*``, ``feature_norm.*``)."""
    from safetensors.torch import load_file

    if src.kind == "timm":
        try:
            return from_timm(src.name, _read_state_dict(src.weights, spec, arg))
        except ValueError as e:
            raise ValueError(f"{arg}: '{spec}': {e}") from None
    if src.sha256:
        if sha256(src.weights) != src.sha256:
            raise ValueError(f"{arg}: '{src.weights}' does not match the sha256 in its card.json: "
                             "the file was changed or damaged")
    sd = load_file(str(src.weights), device="cpu")
    if src.kind == "finetune" and not any(k.startswith("backbone.") for k in sd):
        raise ValueError(f"{arg}: '{src.weights}' holds no backbone.* weights: not a keel classifier")
    return sd


def _read_state_dict(path: Path, spec: str, arg: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle errors come in many classes; any of them means "not a state dict"
        raise ValueError(f"{arg}: '{spec}': cannot read '{path}' as a state dict "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    # training checkpoints keep the weights one level down
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{arg}: '{spec}': '{path}' does not hold a state dict")
    return sd


def _fit_pos_embed(model: nn.Module, sd: dict[str, torch.Tensor], prefix: str, spec: str, arg: str) -> None:
    """Resample a ViT position table made for another image size to the model's grid in place
    (bicubic; the class/distillation tokens' entries are kept as they are)."""
    key = prefix + "pos_embed"
    pe, own = sd.get(key), getattr(model, "pos_embed", None)
    if pe is None or own is None or pe.shape == own.shape:
        return
    tokens = model.num_prefix_tokens
    side = math.isqrt(pe.shape[1] - tokens)
    if side * side != pe.shape[1] - tokens or pe.shape[2] != own.shape[2]:
        raise ValueError(f"{arg}: '{spec}': its pos_embed {tuple(pe.shape)} is not {tokens} prefix tokens "
                         f"+ a square grid of {own.shape[2]}-d entries")
    grid = interpolate_pos_embed(pe[:, tokens:], (side, side), (model.grid, model.grid))
    sd[key] = torch.cat([pe[:, :tokens], grid], dim=1)


def _load(model: nn.Module, sd: dict[str, torch.Tensor], src: _Source, size: int, spec: str, arg: str) -> None:
    target = getattr(model, "backbone", model)
    _fit_pos_embed(target, sd, "backbone." if target is not model else "", spec, arg)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), "")
        if size != src.trained_at:
            raise ValueError(f"{arg}: '{spec}' was trained at {src.trained_at} px and its weights do not fit "
                             f"{src.name} built for {size} px: use img_size={src.trained_at} ({detail or first})"
                             ) from None
        raise ValueError(f"{arg}: the weights of '{spec}' do not fit {src.name}: {detail or first}") from None
