"""``keel show``: from any checkpoint, nearest-neighbour grids, ViT attention maps and MAE
reconstructions; from an image-text run, the top images for text queries. This module computes what to draw (features, neighbours, attention, masks);
:mod:`keel.viz` draws it."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from keel.config import load_config
from keel.data.batches import load_batches
from keel.data.sources import DataError, build_dataset, labeled_splits
from keel.engine.checkpoint import load_checkpoint
from keel.evaluate.frozen import make_eval_transform
from keel.models.registry import create_model, model_kwargs
from keel.tasks.ssl import build_method  # importing the package registers every method, MAE included

# Re-exported: the drawing lives in keel.viz (which the engine may import without the commands);
# keel.show keeps the names its callers and tests already use.
from keel.viz import plt  # noqa: F401
from keel.viz.curves import plot_comparison, plot_run  # noqa: F401
from keel.viz.pictures import (CELL, DPI, MAX_HEADS, TITLE_BAND, plot_attention,  # noqa: F401
                               plot_mae, plot_neighbors, plot_retrieval)


def _seeded_choice(total: int, n: int, seed: int) -> torch.Tensor:
    """n distinct indices out of range(total), the same for the same seed."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def take_images(dataset, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (uint8 (B, 3, H, W), labels (B,), the indices kept) for dataset positions ``indices``;
    files that cannot be decoded are left out."""
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if hasattr(dataset, "images"):
        return dataset.images[indices], dataset.labels[indices], indices
    items = [dataset[int(i)] for i in indices]
    kept = [(img, lab, i) for (img, lab, _), i in zip(items, indices.tolist()) if img is not None]
    if not kept:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), indices[:0]
    imgs, labs, idx = zip(*kept)
    return torch.stack(imgs), torch.tensor(labs, dtype=torch.int64), torch.tensor(idx, dtype=torch.int64)


def sample_images(source: str, img_size: int, n: int, seed: int = 0):
    """n random images (seeded) of a data source, from its test split when it has one.
    -> (uint8 (n, 3, S, S), labels, class names)."""
    try:
        ds = build_dataset(source, "test", img_size, labeled=False)
    except DataError:  # a folder split into train/ only: use it
        ds = build_dataset(source, "train", img_size, labeled=False)
    images, labels, _ = take_images(ds, _seeded_choice(len(ds), n, seed))
    if len(images) == 0:
        raise ValueError(f"none of the {n} images picked from '{source}' could be decoded")
    return images, labels, getattr(ds, "classes", [])


@torch.no_grad()
def embed_images(backbone: torch.nn.Module, images: torch.Tensor, img_size: int, device="cpu") -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, D) pooled features on the CPU, with the evaluation transform."""
    x = make_eval_transform(img_size)(images.to(device))
    return backbone.embed(x).float().cpu()


@torch.no_grad()
def embed_dataset(backbone: torch.nn.Module, dataset, img_size: int, device="cpu", batch_size: int = 256,
                  progress: bool = True, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of every image of ``dataset`` -> (feats (N', D), labels (N',), index (N',)) where
    ``index`` gives each row's position in the dataset (files that cannot be decoded are left out,
    so rows and positions can differ). A progress bar appears when it takes more than a second."""
    from tqdm.auto import tqdm

    index_batches = torch.arange(len(dataset)).split(batch_size)
    # decoded on the CPU: embed_images moves each batch to the device itself
    batches = load_batches(dataset, index_batches, torch.device("cpu"), num_workers, index=True)
    feats, labels, index = [], [], []
    was_training = backbone.training
    backbone.eval()
    try:
        for batch in tqdm(batches, total=len(index_batches), desc="gallery", unit="batch", delay=1.0,
                          disable=not progress, dynamic_ncols=True):
            images = batch["images"]
            if len(images):
                feats.append(embed_images(backbone, images, img_size, device))
                # load_batches leaves out the labels of unlabeled data, which sources mark -1 per image
                labels.append(batch["labels"])
                index.append(batch["index"])
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("no image of the gallery could be decoded")
    return torch.cat(feats), torch.cat(labels), torch.cat(index)


def nearest_neighbors(query: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                      return_scores: bool = False):
    """Indices (Q, k) of each query's k most cosine-similar gallery rows, most similar first.
    ``exclude`` (Q,): a gallery row each query may not return (the query itself when it is part
    of the gallery; -1 for none). With ``return_scores``: (indices, cosine similarities)."""
    sims = F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    if exclude is not None:
        exclude = torch.as_tensor(exclude, dtype=torch.int64)
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        sims[rows, exclude[rows]] = float("-inf")
    k = min(k, gallery.shape[0] - (0 if exclude is None else int((exclude >= 0).any())))
    scores, idx = sims.topk(k, dim=1)
    return (idx, scores) if return_scores else idx


def neighbor_splits(source: str, img_size: int, gallery: int, seed: int = 0):
    """(gallery dataset, query dataset or None): labeled train/test when the data has labels,
    else all images as gallery (None: queries come from the gallery itself). The gallery is a
    seeded random subset of at most ``gallery`` images."""
    try:
        train, test = labeled_splits(source, img_size)
    except DataError:
        train, test = build_dataset(source, "train", img_size, labeled=False), None
    if 0 < gallery < len(train):
        train = train.subset(_seeded_choice(len(train), gallery, seed).sort().values)
    return train, test


def show_neighbors(backbone, data: str, out_dir: str | Path, img_size: int, n: int = 8, k: int = 8,
                   gallery: int = 5000, seed: int = 0, device="cpu", name: str = "", progress: bool = True) -> Path:
    """``neighbors.png``: for n queries (the test split, or random images) their k nearest
    neighbours by cosine similarity among the gallery (the train split, or all images)."""
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    gal_ds, query_ds = neighbor_splits(data, img_size, gallery, seed)
    feats, labels, index = embed_dataset(backbone, gal_ds, img_size, device, progress=progress,
                                         num_workers=0 if hasattr(gal_ds, "images") else min(4, os.cpu_count() or 1))
    if query_ds is None:  # queries are gallery images: skip each one's own match
        rows = _seeded_choice(len(feats), n, seed + 1)
        q_imgs, q_labels, _ = take_images(gal_ds, index[rows])
        q_feats, exclude = feats[rows], rows
    else:
        q_imgs, q_labels, _ = take_images(query_ds, _seeded_choice(len(query_ds), n, seed + 1))
        if len(q_imgs) == 0:
            raise ValueError(f"none of the {n} query images picked from '{data}' could be decoded")
        q_feats, exclude = embed_images(backbone, q_imgs, img_size, device), None
    if len(feats) < 1 + (exclude is not None):
        raise ValueError(f"the gallery of '{data}' has too few images for neighbours")
    idx, scores = nearest_neighbors(q_feats, feats, k, exclude=exclude, return_scores=True)
    nb_imgs, _, _ = take_images(gal_ds, index[idx.reshape(-1)])  # decoded once already: none dropped
    nb_imgs = nb_imgs.reshape(*idx.shape, *nb_imgs.shape[1:])
    where = ("queries from the test split, gallery: {} train images" if query_ds is not None else
             "queries drawn from the gallery of {} images (their own match left out)").format(len(feats))
    title = f"nearest neighbours (cosine) · {name} · {data}\n{where}"
    return plot_neighbors(q_imgs, q_labels, nb_imgs, labels[idx], scores, Path(out_dir) / "neighbors.png",
                          title, classes=getattr(gal_ds, "classes", []))


def show_retrieval(run_dir: str | Path, data: str, out_dir: str | Path, queries: list[str] | None = None,
                   n: int = 8, k: int = 8, gallery: int = 5000, seed: int = 0, device="cpu") -> Path:
    """``retrieval.png``: for each text query, the ``k`` images of ``data`` closest to it under a
    ``keel clip train`` run (the test split of labeled data, else all its images; at most
    ``gallery`` of them, drawn at random). No query given: "a photo of a {class}" for up to ``n``
    of the data's classes."""
    from keel.evaluate.zeroshot import embed_dataset as embed_pairs_or_images, top_images
    from keel.jobs.clip import load_clip
    task, tok = load_clip(run_dir, device)
    train, test = neighbor_splits(data, task.img_size, 0, seed)
    pool = test if test is not None else train
    if 0 < gallery < len(pool):
        pool = pool.subset(_seeded_choice(len(pool), gallery, seed).sort().values)
    classes = list(getattr(pool, "classes", []) or [])
    if not queries:
        if not classes:
            raise ValueError(f"'{data}' has no class names to ask for: give --query TEXT (one or more)")
        queries = [f"a photo of a {c}" for c in classes[:n]]
    feats, labels, rows = embed_pairs_or_images(task, pool)
    found = [top_images(task, tok, q, feats, k) for q in queries]
    scores = torch.stack([f[0] for f in found])
    idx = torch.stack([f[1] for f in found])
    imgs, _, _ = take_images(pool, rows[idx.reshape(-1)])
    imgs = imgs.reshape(*idx.shape, *imgs.shape[1:])
    title = f"text -> image retrieval · {Path(run_dir).resolve().name} · {Path(data).name or data} ({len(feats)} images)"
    return plot_retrieval(queries, imgs, labels[idx], scores, Path(out_dir) / "retrieval.png", title, classes)


def _check_attention(backbone) -> None:
    if not hasattr(backbone, "last_self_attention"):
        raise ValueError(f"attention maps need a ViT backbone (vit_*, deit_*); this one is a {type(backbone).__name__}")
    if not getattr(backbone, "num_prefix_tokens", 0):
        raise ValueError("attention maps are where the class token looks; this ViT has no class token")


@torch.no_grad()
def class_token_attention(backbone, x: torch.Tensor) -> torch.Tensor:
    """Row 0 of the last block's attention: where the class token looks, (B, heads, P + N) over
    the P prefix tokens then the N patches. Each row sums to 1 (a softmax)."""
    _check_attention(backbone)
    return backbone.last_self_attention(x)[:, :, 0].float()


@torch.no_grad()
def attention_maps(backbone, images: torch.Tensor, img_size: int, device="cpu") -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the class token's attention over the patches, per head, on the patch
    grid and upsampled (nearest: one flat square per patch) to (B, heads, img_size, img_size)."""
    _check_attention(backbone)
    x = make_eval_transform(img_size)(images.to(device))
    row = class_token_attention(backbone, x)[:, :, backbone.num_prefix_tokens:]
    p = backbone.cfg.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    grid = row.reshape(*row.shape[:2], h, w)
    return F.interpolate(grid, size=(h * p, w * p), mode="nearest").cpu()


def show_attention(backbone, data: str, out_dir: str | Path, img_size: int, n: int = 8, seed: int = 0,
                   device="cpu", name: str = "") -> Path:
    """``attention.png``: the class token's last-block attention for n random images (ViTs)."""
    _check_attention(backbone)
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    images, _, _ = sample_images(data, img_size, n, seed)
    maps = attention_maps(backbone, images, img_size, device)
    title = (f"class-token attention, last block · {name} · {data}\n"
             f"brighter = attended more; each panel scaled to its own range")
    return plot_attention(images, maps, Path(out_dir) / "attention.png", title)


def mae_run_dir(path: str | Path) -> Path:
    """The run directory of ``path`` (itself, or the run holding a backbone.safetensors, card.json
    or checkpoints/last.pt); FileNotFoundError when it is not a run with a training checkpoint."""
    p = Path(path)
    if p.is_file():
        p = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    if not p.exists():
        raise FileNotFoundError(f"no run directory at '{path}'")
    if not (p / "config.yaml").is_file():
        raise FileNotFoundError(f"'{p}' is not a run directory (no config.yaml): MAE pictures need the run a "
                                f"MAE pretraining wrote, not an exported backbone alone")
    if not (p / "checkpoints" / "last.pt").is_file():
        raise FileNotFoundError(f"'{p}' has no training checkpoint (checkpoints/last.pt), which holds the MAE decoder")
    return p


def load_mae(run_dir: str | Path, device="cpu"):
    """Rebuild a MAE run's method (backbone + decoder) from its config and last checkpoint -> (method, cfg)."""
    run_dir = mae_run_dir(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.method.name != "mae":
        raise ValueError(f"'{run_dir}' is a {cfg.method.name} run: MAE pictures need a run pretrained with "
                         f"method.name=mae (its decoder draws the missing patches)")
    backbone = create_model(cfg.model.name, **model_kwargs(cfg))
    method = build_method(cfg.method.name, backbone, cfg)
    method.load_state_dict(load_checkpoint(run_dir)["method"])
    return method.to(device).eval(), cfg


@torch.no_grad()
def mae_reconstructions(method, images: torch.Tensor, seed: int = 0) -> dict:
    """``method.reconstruct`` on uint8 (B, 3, H, W) with a seeded mask -> dict(original, masked,
    reconstruction), each float (B, 3, H, W) in [0, 1] on the CPU."""
    device = next(method.parameters()).device
    out = method.reconstruct(images.to(device), torch.Generator().manual_seed(seed))
    return {key: out[key].float().cpu() for key in ("original", "masked", "reconstruction")}


def show_mae(run_dir: str | Path, data: str | None = None, out_dir: str | Path | None = None, n: int = 8,
             seed: int = 0, device="cpu") -> Path:
    """``mae.png``: n images (from ``data``, default the run's own), masked as in pretraining, and
    what the MAE decoder draws from the visible patches (visible patches are pasted back as they are)."""
    method, cfg = load_mae(run_dir, device)
    run_dir = mae_run_dir(run_dir)
    data = data or cfg.data.source
    images, _, _ = sample_images(data, cfg.data.img_size, n, seed)
    pictures = mae_reconstructions(method, images, seed)
    ratio = getattr(method, "mask_ratio", None)
    masked = f"{ratio:.0%} of the patches masked" if isinstance(ratio, float) else "patches masked at random"
    title = f"MAE reconstructions · {run_dir.name} · {data}\n{masked}; rows: original, masked, reconstruction"
    return plot_mae(pictures, Path(out_dir or run_dir) / "mae.png", title)
