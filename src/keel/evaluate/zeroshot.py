"""Zero-shot classification by prompts and image-text retrieval with a trained image-text model.

* :func:`zeroshot_weights`: one embedding per class, the mean of its prompts' text embeddings
  (every template filled with the class name), normalised again (CLIP's prompt ensembling);
  :func:`zeroshot_eval` scores a labeled image set against them (top-1 / top-5, percent).
* :func:`retrieval_recall`: recall@K both ways on paired embeddings: image -> text and
  text -> image; identical captions are one text, answered by any of their images.
* :func:`zeroshot_from_run`, :func:`retrieval_from_run`: both for a ``keel clip train`` run
  directory (``keel eval zeroshot | retrieval``, ``keel clip zeroshot | retrieval``).

Embeddings come from :class:`keel.tasks.clip.ClipTask` (``embed_images``, ``encode_text``), all
L2-normalised, so a dot product is the cosine similarity both towers were trained on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from keel.data.batches import load_batches
from keel.evaluate.linear import accuracy_topk

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
                     "a close-up photo of a {}.", "{}")


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates from a file, one a line, each with ``{}`` where the class name goes."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    bad = [ln for ln in lines if "{}" not in ln]
    if not lines or bad:
        raise ValueError(f"{path}: every template needs {{}} where the class name goes"
                         + (f" (not: {bad[0]!r})" if bad else " (the file has none)"))
    return lines


@torch.no_grad()
def embed_texts(task, tokenizer, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    device = next(task.parameters()).device
    task.eval()
    out = [task.encode_text(tokenizer.encode(list(texts[i:i + batch_size])).to(device)).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0, task.text.cfg.embed_dim)


@torch.no_grad()
def embed_dataset(task, dataset, batch_size: int = 256, num_workers: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(image embeddings, labels, rows)`` of every decodable image (``rows``: positions in the
    dataset; for pairs, ``labels`` are the captions' tokens)."""
    device = next(task.parameters()).device
    task.eval()
    feats, labels, rows = [], [], []
    for b in load_batches(dataset, torch.arange(len(dataset)).split(batch_size), device, num_workers, index=True):
        if len(b["images"]) == 0:
            continue
        feats.append(task.embed_images(b["images"]).float().cpu())
        labels.append(b["labels"].cpu() if "labels" in b else torch.full((len(b["images"]),), -1))
        rows.append(torch.as_tensor(b["index"]))
    if not feats:
        raise ValueError("no image of the data could be decoded")
    return torch.cat(feats), torch.cat(labels), torch.cat(rows)


def zeroshot_weights(task, tokenizer, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> Tensor:
    """(C, D): per class the mean of its prompts' embeddings, re-normalised."""
    if not classnames:
        raise ValueError("zero-shot needs the class names (the data has none: give --classes)")
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = embed_texts(task, tokenizer, prompts).view(len(classnames), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def zeroshot_eval(task, tokenizer, dataset, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                  batch_size: int = 256, num_workers: int = 0) -> dict:
    """Top-1 / top-5 accuracy (percent) of prompt classification on a labeled image set."""
    weights = zeroshot_weights(task, tokenizer, classnames, templates)
    feats, labels, _ = embed_dataset(task, dataset, batch_size, num_workers)
    acc = accuracy_topk(feats @ weights.T, labels, (1, 5))
    return {"top1": acc[1], "top5": acc[5], "images": len(labels), "classes": len(classnames),
            "templates": len(templates), "chance": 100.0 / len(classnames)}


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, ks: Sequence[int] = (1, 5, 10),
                     text_of_image: Tensor | None = None) -> dict:
    """Recall@K (percent) both ways. Row i of ``image_emb`` belongs with text ``text_of_image[i]``
    (default: text i). Several images may share one text (identical captions are one text, else
    ties between copies decide the score): a text query is answered when any of its images is among
    the K most similar. Ties count in the partner's favour."""
    target = torch.arange(len(image_emb)) if text_of_image is None else torch.as_tensor(text_of_image).long()
    if image_emb.shape[1:] != text_emb.shape[1:] or len(target) != len(image_emb) or \
            (text_of_image is None and len(text_emb) != len(image_emb)):
        raise ValueError(f"paired embeddings do not match: {tuple(image_emb.shape)} images, "
                         f"{tuple(text_emb.shape)} texts")
    sim = image_emb.float() @ text_emb.float().T                     # (images, texts)
    rows = torch.arange(len(sim))
    # image -> text: how many texts score strictly higher than its own
    i2t = (sim > sim[rows, target].unsqueeze(1)).sum(1)
    # text -> image: its best own image's score; how many other images score strictly higher
    own = torch.zeros_like(sim, dtype=torch.bool)
    own[rows, target] = True
    best = sim.masked_fill(~own, float("-inf")).amax(0)
    queried = own.any(0)                                             # texts with an image
    t2i = ((sim > best) & ~own).sum(0)[queried]
    out = {}
    for name, rank in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            out[f"{name}@{k}"] = 100.0 * float((rank < k).float().mean())
    return out


def retrieval_eval(task, tokenizer, pairs_dataset, ks: Sequence[int] = (1, 5, 10), batch_size: int = 256,
                   num_workers: int = 0) -> dict:
    """Recall@K both ways over the pairs of a :class:`keel.data.pairs.PairData`; identical captions
    are embedded once and count as one text (see :func:`retrieval_recall`)."""
    img, _, rows = embed_dataset(task, pairs_dataset, batch_size, num_workers)
    texts = [pairs_dataset.records.texts[int(r)] for r in rows]
    unique = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(unique)}
    out = retrieval_recall(img, embed_texts(task, tokenizer, unique, batch_size), ks,
                           torch.tensor([where[t] for t in texts]))
    out.update(pairs=len(rows), texts=len(unique))
    return out


def top_images(task, tokenizer, query: str, image_emb: Tensor, k: int = 8) -> tuple[Tensor, Tensor]:
    """(scores, rows) of the ``k`` images closest to a text query."""
    q = embed_texts(task, tokenizer, [query])[0]
    return (image_emb @ q).topk(min(k, len(image_emb)))


def zeroshot_from_run(run: str | Path, data: str, templates: str | None = None, classes: str | None = None,
                      split: str = "test", device="cpu") -> dict:
    """:func:`zeroshot_eval` of a ``keel clip train`` run on a labeled image set (a built-in name or
    class folders); ``templates`` / ``classes``: files, one template (with ``{}``) / name a line."""
    from keel.data.sources import build_dataset
    from keel.jobs.clip import load_clip
    task, tok = load_clip(run, device)
    dataset = build_dataset(data, split, task.img_size, labeled=True)
    names = dataset.classes
    if classes:
        names = [ln.strip() for ln in Path(classes).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(names) != len(dataset.classes):
            raise ValueError(f"{classes}: {len(names)} class names for {len(dataset.classes)} classes in {data}")
    return zeroshot_eval(task, tok, dataset, names, read_templates(templates) if templates else list(DEFAULT_TEMPLATES))


def retrieval_from_run(run: str | Path, data: str, device="cpu") -> dict:
    """:func:`retrieval_eval` of a ``keel clip train`` run on image-text pairs (a folder or CSV)."""
    from keel.data.pairs import PairData, read_pairs
    from keel.jobs.clip import load_clip
    task, tok = load_clip(run, device)
    rec = read_pairs(data)
    return retrieval_eval(task, tok, PairData(rec, tok.encode(rec.texts), task.img_size))


def describe_zeroshot(res: dict) -> str:
    return (f"zero-shot on {res['images']} images, {res['classes']} classes, {res['templates']} templates: "
            f"top-1 {res['top1']:.1f}, top-5 {res['top5']:.1f} (chance {res['chance']:.1f})")


def describe_retrieval(res: dict) -> str:
    return (f"retrieval over {res['pairs']} pairs ({res['texts']} distinct captions): "
            + ", ".join(f"{k} {v:.1f}" for k, v in res.items() if "@" in k))
