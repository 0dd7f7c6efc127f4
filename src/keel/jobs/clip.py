"""Image-text pretraining from a config to a finished run, and the trained towers back.

* ``clip_train(cfg, run_dir)``: read the pairs (:mod:`keel.data.pairs`), train the BPE tokenizer
  on the captions (``tokenizer.json``), build the image tower from ``model.image`` (any keel
  backbone spec, see :mod:`keel.hub`) and the text tower by name, train on the shared trainer
  (:class:`keel.tasks.clip.ClipTask`), then export the image tower as a keel backbone
  (``backbone.safetensors`` + ``card.json``: ``keel eval knn model.backbone=RUN`` and every other
  evaluation read it) and both towers with their projections (``clip.safetensors`` + ``clip.json``).
* ``load_clip(run_dir)``: the trained task and tokenizer again (safetensors and JSON: loading
  never runs code).

Artifacts: config.yaml, metrics.jsonl, checkpoints/last.pt, tokenizer.json, backbone.safetensors,
card.json, clip.safetensors, clip.json, result.json, curves.png.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from keel import hub
from keel.config import ConfigError, load_config, to_dict
from keel.data.pairs import PairData, PairRecords, pair_source
from keel.data.sources import check_crop_from
from keel.engine import distributed as D
from keel.engine.checkpoint import export_backbone, save_weights, write_json
from keel.engine.trainer import Trainer
from keel.models.registry import create_model
from keel.models.text import CaptionTokenizer, create_text_model, list_text_models
from keel.tasks.clip import ClipTask
from keel.tasks.clip_config import ClipConfig
from keel.version import __version__


def check(cfg: ClipConfig) -> None:
    d, m = cfg.data, cfg.model
    if not d.source:
        raise ConfigError("data.source: give image-text pairs (a folder with a .txt beside each image, a .csv "
                          "with image and text columns, or shards:PATH)")
    if not m.image:
        raise ConfigError("model.image: give the image tower (a keel run directory, .safetensors, "
                          "timm:<model>:<file> or random:<model>)")
    if m.text not in list_text_models():
        raise ConfigError(f"model.text must be one of {' | '.join(list_text_models())}, got {m.text!r}")
    if m.loss not in ("clip", "siglip"):
        raise ConfigError(f"model.loss must be clip or siglip, got {m.loss!r}")
    if m.embed_dim < 1 or d.vocab_size < 260 or d.context_length < 0 or d.img_size < 0:
        raise ConfigError("model.embed_dim must be >= 1, data.vocab_size >= 260 (the 256 bytes and 3 special "
                          "tokens), data.context_length and data.img_size >= 0")
    check_crop_from(d.crop_from)
    if not 0.0 < d.crop_scale_min <= 1.0:
        raise ConfigError(f"data.crop_scale_min must be in (0, 1], got {d.crop_scale_min}")


def build_task(cfg: ClipConfig, vocab_size: int, context_length: int) -> tuple[ClipTask, dict]:
    """The task and what clip.json needs to rebuild it (the image tower's model name and kwargs)."""
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    backbone, size = hub.resolve_backbone(m.image, cfg.data.img_size or None, seed=cfg.train.seed, arg="model.image")
    name, kwargs = hub.model_of(m.image, "model.image")     # what the card records
    text = create_text_model(m.text, vocab_size=vocab_size, context_length=context_length, embed_dim=m.embed_dim)
    task = ClipTask(backbone, text, m.embed_dim, size, m.loss, m.local_loss, m.lock_image,
                    (cfg.data.crop_scale_min, 1.0))
    meta = {"image_model": name, "image_kwargs": {**kwargs, "img_size": size}, "text_model": m.text,
            "text_kwargs": {"vocab_size": vocab_size, "context_length": context_length, "embed_dim": m.embed_dim},
            "embed_dim": m.embed_dim, "loss": m.loss, "img_size": size}
    return task, meta


def _own_context(name: str) -> int:
    with torch.device("meta"):     # no memory, no draw from the random stream
        return create_text_model(name).cfg.context_length


def default_run_dir(cfg: ClipConfig) -> Path:
    spec = cfg.model.image.rstrip("/")
    what = spec.split(":")[1] if spec.startswith(("timm:", "random:")) else Path(spec).name
    data = Path(cfg.data.source.removeprefix("shards:")).stem or "data"
    return Path(cfg.train.out_dir) / "-".join([cfg.model.loss, what or "image", data, time.strftime("%Y%m%d-%H%M%S")])


def clip_train(cfg: ClipConfig | None, run_dir: str | Path | None = None, resume: bool = False,
               quiet: bool = False, pairs: PairRecords | None = None) -> dict:
    """Train (or with ``resume`` continue) an image-text model; returns result.json's content.
    ``pairs``: pairs already in memory (images as a uint8 tensor) instead of reading data.source,
    which then only names them."""
    if resume:
        cfg = load_config(Path(run_dir) / "config.yaml", cls=ClipConfig)
    if pairs is not None and not cfg.data.source:
        cfg.data.source = pairs.name
    check(cfg)
    D.init_distributed(cfg.train.device)
    # one name for every process (the default holds the time, which processes read apart)
    run_dir = Path(D.broadcast_object(str(run_dir if run_dir is not None else default_run_dir(cfg))))
    d = cfg.data
    records, shards = (pairs, None) if pairs is not None else \
        pair_source(d.source, d.image_column, d.text_column, d.img_size or 32, d.shuffle_buffer,
                    whole=d.crop_from == "whole")
    ctx = d.context_length or _own_context(cfg.model.text)
    tok_path = run_dir / "tokenizer.json"
    if resume and tok_path.is_file():
        tokenizer = CaptionTokenizer.load(tok_path)
    else:
        texts = records.texts if records is not None else shards.texts()
        if not texts:
            raise ConfigError(f"data.source {d.source}: no caption to train the tokenizer on")
        tokenizer = CaptionTokenizer.train(texts, d.vocab_size, ctx)
    task, meta = build_task(cfg, tokenizer.vocab_size, tokenizer.context_length)
    d.img_size = meta["img_size"]      # config.yaml records the size used
    if records is not None:
        data = PairData(records, tokenizer.encode(records.texts), meta["img_size"], whole=d.crop_from == "whole")
    else:
        shards.img_size = meta["img_size"]
        shards.encode = tokenizer.encode
        data = shards
    trainer = Trainer(cfg, run_dir, resume=resume, quiet=quiet)
    if trainer.writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tok_path)
    if trainer.is_main and not quiet:
        bad = records.skipped if records is not None else {}
        print(f"{cfg.model.loss} · image {cfg.model.image}{' (locked)' if cfg.model.lock_image else ''} · text "
              f"{cfg.model.text} · {len(data)} pairs" + (f", skipped {bad}" if bad else "")
              + f" · vocabulary {tokenizer.vocab_size} · {meta['img_size']} px · {trainer.device} × "
              f"{trainer.dist.world_size} → {run_dir}")
    result = trainer.fit(task, data)
    out = {"run_dir": str(run_dir), "steps": result["steps"], "finished": result["finished"], "loss": result["loss"],
           "pairs": len(data), "skipped_pairs": records.skipped if records is not None else {},
           "skipped_images": result["skipped"], "config": to_dict(cfg)}
    if trainer.writes:
        save_towers(task, meta, cfg, out, run_dir)
        write_json(run_dir / "result.json", out)
    D.barrier()
    return out


def save_towers(task: ClipTask, meta: dict, cfg: ClipConfig, result: dict, run_dir: Path) -> None:
    card = {"model": meta["image_model"], "model_kwargs": meta["image_kwargs"], "method": cfg.model.loss,
            "data": {"source": cfg.data.source, "images": result["pairs"], "skipped": result["skipped_images"],
                     "img_size": meta["img_size"]},
            "steps": result["steps"], "finished": result["finished"], "config": to_dict(cfg),
            "metrics": {"final_loss": result["loss"], "knn_top1": None}, "keel_version": __version__}
    export_backbone(task.backbone, run_dir, card)
    save_weights(task, run_dir / "clip.safetensors", {"format": "pt"})
    write_json(run_dir / "clip.json", meta)


def is_clip_run(spec: str) -> bool:
    """Whether ``spec`` is a ``keel clip train`` run directory (it has clip.json)."""
    return bool(spec) and (Path(spec).expanduser() / "clip.json").is_file()


def load_clip(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ClipTask, CaptionTokenizer]:
    """The trained task (eval mode) and its tokenizer, from clip.json, clip.safetensors and tokenizer.json."""
    from safetensors.torch import load_file
    run_dir = Path(run_dir)
    need = [run_dir / n for n in ("clip.json", "clip.safetensors", "tokenizer.json")]
    missing = [p.name for p in need if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--checkpoint {run_dir}: not a keel clip run (missing {', '.join(missing)})")
    meta = json.loads(need[0].read_text())
    with torch.random.fork_rng(devices=[]):
        backbone = create_model(meta["image_model"], **meta["image_kwargs"])
        text = create_text_model(meta["text_model"], **meta["text_kwargs"])
    task = ClipTask(backbone, text, meta["embed_dim"], meta["img_size"], meta["loss"])
    task.load_state_dict(load_file(str(need[1]), device="cpu"))
    return task.to(device).eval(), CaptionTokenizer.load(need[2])
