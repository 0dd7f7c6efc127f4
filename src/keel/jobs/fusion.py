"""``keel finetune`` on image + text data: ``model.backbone`` is a ``keel clip train`` run, and a
classifier trains on both towers' frozen embeddings (:mod:`keel.tasks.fusion`).

The towers embed each labeled pair once; an image-only, a text-only, a late-fusion (``concat``) and
an attention-fusion head train on the same split (every 5th pair held out) with ``train.epochs``
and ``train.seed``, and all four test top-1 go into result.json side by side. The head named by
``task.fusion`` is kept: ``fusion.safetensors`` (its weights and the embeddings' standardisation)
and ``fusion.json`` (how to rebuild it, the class names, the image-text run it reads);
:func:`load_fusion` gives it back. :func:`fusion_from_run` is the same comparison without a run
directory (``keel clip fusion``). The other fine-tuning keys (views, recipes, distillation) are for
images alone and are not used here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from keel.config import ConfigError, FinetuneConfig, save_config
from keel.data.pairs import PairData, read_pairs
from keel.engine.checkpoint import save_weights, write_json
from keel.evaluate.zeroshot import embed_dataset, embed_texts
from keel.jobs.clip import load_clip
from keel.tasks.fusion import FUSED, FusionHead, fusion_eval


def fusion_from_run(run_dir: str | Path, source: str, epochs: int = 100, device: str = "cpu", seed: int = 0,
                    heads: dict | None = None) -> dict:
    """Fusion vs single-tower heads on labeled pairs (a folder of class sub-folders with a .txt per
    image, or a CSV with a label column), embedded by a ``keel clip train`` run's frozen towers.
    The result holds the class names; ``heads`` (a dict) receives the trained heads."""
    task, tok = load_clip(run_dir, device)
    rec = read_pairs(source)
    if not rec.classes:
        raise ValueError(f"'{source}' has no labels: give class sub-folders or a CSV label column")
    data = PairData(rec, tok.encode(rec.texts), task.img_size)
    img, _, rows = embed_dataset(task, data)
    txt = embed_texts(task, tok, [rec.texts[int(r)] for r in rows])
    y = rec.labels[rows]
    test = torch.arange(len(rows)) % 5 == 0
    res = fusion_eval((img[~test], txt[~test], y[~test]), (img[test], txt[test], y[test]), len(rec.classes),
                      epochs=epochs, seed=seed, heads=heads)
    res.update(train=int((~test).sum()), test=int(test.sum()), classes=len(rec.classes),
               class_names=list(rec.classes), skipped_pairs=dict(rec.skipped))
    return res


def run_fusion(cfg: FinetuneConfig, run_dir: str | Path) -> dict:
    """Train the four heads, keep ``task.fusion``'s, write the run; returns result.json's content."""
    from keel.engine.distributed import resolve_device
    if cfg.task.fusion not in FUSED:
        raise ConfigError(f"task.fusion must be one of {' | '.join(FUSED)}, got {cfg.task.fusion!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("fusion heads train on embeddings in one process: run keel finetune without torchrun")
    if cfg.data.test_source:
        raise ConfigError("data.test_source: fusion holds out every 5th pair of data.source; give no test_source")
    heads: dict = {}
    device = resolve_device(cfg.train.device)
    res = fusion_from_run(cfg.model.backbone, cfg.data.source, epochs=cfg.train.epochs, device=str(device),
                          seed=cfg.train.seed, heads=heads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    head = heads[cfg.task.fusion]
    save_weights(head, run_dir / "fusion.safetensors", {"format": "pt"})
    write_json(run_dir / "fusion.json", {
        "kind": head.kind, "img_dim": head.img_mean.numel(), "txt_dim": head.txt_mean.numel(),
        "num_classes": res["classes"], "hidden": head.hidden, "classes": res["class_names"],
        "clip_run": str(cfg.model.backbone)})
    result = dict(res, mode=f"fusion ({cfg.task.fusion})", kept=cfg.task.fusion, run_dir=str(run_dir))
    write_json(run_dir / "result.json", result)
    return result


def load_fusion(run_dir: str | Path) -> tuple[FusionHead, dict]:
    """The kept head (eval mode; it takes raw embeddings) and fusion.json."""
    from safetensors.torch import load_file
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "fusion.json").read_text())
    head = FusionHead(meta["kind"], meta["img_dim"], meta["txt_dim"], meta["num_classes"], meta["hidden"])
    head.load_state_dict(load_file(str(run_dir / "fusion.safetensors")))
    return head.eval(), meta
