"""Image-text pairs for CLIP/SigLIP training, zero-shot, retrieval and fusion.

Three layouts (``source``):

* a folder: every image with a ``.txt`` of the same stem beside it (``shoe_01.jpg`` +
  ``shoe_01.txt``); when every image sits in a class sub-folder (two or more), that folder is its
  label (for fusion);
* a ``.csv`` file with an image-path column and a text column (``image``/``filepath``/``path`` and
  ``text``/``caption``/``title`` are found by name, or named with ``image_column``/``text_column``;
  an optional ``label`` column), paths relative to the CSV;
* ``shards:PATH``: ``keel shards`` output whose samples carry a ``txt`` member (see
  :class:`PairShards`).

An image without a caption or with an empty one is skipped and counted (``skipped``: reason ->
count); an image that does not decode is skipped at training time like everywhere else
(:func:`keel.data.folders.collate_skip`). The tokens of a pair travel in the batch's ``labels``
slot ((B, context_length) int64), so the shared loaders and the trainer carry them unchanged.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from keel.data.decode import decode_center, decode_whole, train_side
from keel.data.errors import BadImageError, DataError
from keel.data.folders import skip_reason, scan_images
from keel.data.shards import ShardSource, _Decoder, _Lazy, _samples, is_shards

# A CSV's columns, found by name (case-insensitive): here and in keel shards
IMAGE_COLUMNS = ("image", "filepath", "path", "image_path", "file")
TEXT_COLUMNS = ("text", "caption", "title", "captions")
LABEL_COLUMNS = ("label", "class", "category")


@dataclass
class PairRecords:
    """Paths (or in-memory images), their captions, labels (-1: none) and what was skipped."""
    texts: list[str]
    paths: list[str] | None = None
    images: torch.Tensor | None = None           # uint8 (N, 3, H, W), instead of paths
    labels: torch.Tensor | None = None
    classes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    name: str = "pairs"

    def __post_init__(self):
        if self.labels is None:
            self.labels = torch.full((len(self.texts),), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "PairRecords":
        idx = [int(i) for i in idx]
        return PairRecords([self.texts[i] for i in idx], [self.paths[i] for i in idx] if self.paths else None,
                           self.images[idx] if self.images is not None else None, self.labels[idx],
                           list(self.classes), dict(self.skipped), self.name)


def _keep(texts, skipped: dict[str, int]) -> list[bool]:
    keep = []
    for t in texts:
        if t is None:
            skipped["no caption"] = skipped.get("no caption", 0) + 1
        elif not t.strip():
            skipped["empty text"] = skipped.get("empty text", 0) + 1
        keep.append(t is not None and bool(t.strip()))
    return keep


def read_pairs(source: str, image_column: str = "", text_column: str = "", label_column: str = "") -> PairRecords:
    """The pairs of a folder or CSV (see the module docstring); shards go through :class:`PairShards`."""
    path = Path(os.path.expanduser(source))
    if is_shards(source):
        raise DataError(f"{source}: shards are read with PairShards, not read_pairs")
    if path.is_dir():
        return _folder_pairs(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _csv_pairs(path, image_column, text_column, label_column)
    raise DataError(f"image-text data '{source}' is neither a folder (an image + .txt per pair), a .csv file "
                    "nor shards:PATH")


def _folder_pairs(root: Path) -> PairRecords:
    paths = scan_images(str(root))
    if not paths:
        raise DataError(f"no image files found under '{root}'")
    texts = []
    for p in paths:
        txt = Path(p).with_suffix(".txt")
        texts.append(txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None)
    skipped: dict[str, int] = {}
    keep = _keep(texts, skipped)
    paths = [p for p, k in zip(paths, keep) if k]
    texts = [t.strip() for t, k in zip(texts, keep) if k]
    if not paths:
        raise DataError(f"'{root}': no image has a non-empty .txt caption of the same name beside it")
    parts = [os.path.relpath(p, root).split(os.sep) for p in paths]
    classes, labels = [], None
    if all(len(q) > 1 for q in parts) and len({q[0] for q in parts}) >= 2:
        classes = sorted({q[0] for q in parts})
        labels = torch.tensor([classes.index(q[0]) for q in parts], dtype=torch.int64)
    return PairRecords(texts, paths, labels=labels, classes=classes, skipped=skipped, name=root.name)


def _column(fields: list[str], given: str, names: tuple[str, ...], what: str, csv_path: Path) -> str | None:
    if given:
        if given not in fields:
            raise DataError(f"{csv_path}: no column {given!r} (columns: {', '.join(fields)})")
        return given
    lower = {f.lower(): f for f in fields}
    found = next((lower[n] for n in names if n in lower), None)
    if found is None and what != "label":
        raise DataError(f"{csv_path}: no {what} column (looked for {', '.join(names)}; columns: "
                        f"{', '.join(fields)}): name it with data.{what}_column")
    return found


def _csv_pairs(path: Path, image_column: str, text_column: str, label_column: str) -> PairRecords:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    img = _column(fields, image_column, IMAGE_COLUMNS, "image", path)
    txt = _column(fields, text_column, TEXT_COLUMNS, "text", path)
    lab = _column(fields, label_column, LABEL_COLUMNS, "label", path)
    skipped: dict[str, int] = {}
    keep = _keep([r.get(txt) for r in rows], skipped)
    rows = [r for r, k in zip(rows, keep) if k]
    if not rows:
        raise DataError(f"{path}: no row has a non-empty {txt!r}")
    paths = [str((path.parent / r[img]).resolve()) if not os.path.isabs(r[img]) else r[img] for r in rows]
    classes, labels = [], None
    if lab:
        classes = sorted({r[lab] for r in rows})
        labels = torch.tensor([classes.index(r[lab]) for r in rows], dtype=torch.int64)
    return PairRecords([r[txt].strip() for r in rows], paths, labels=labels, classes=classes,
                       skipped=skipped, name=path.stem)


class PairData(Dataset):
    """Pairs as a dataset for the shared loaders: ``labels`` are the tokens. In-memory images
    expose ``images`` (indexed directly, resident on the GPU); paths decode lazily, centre-cropped
    to ``img_size`` or, with ``whole`` (training), whole with their aspect kept (as
    :class:`keel.data.folders.ImageFolder`), an undecodable file coming back as its reason."""

    def __init__(self, records: PairRecords, tokens: torch.Tensor, img_size: int, whole: bool = False):
        if len(tokens) != len(records):
            raise ValueError(f"{len(tokens)} token rows for {len(records)} pairs")
        self.records, self.img_size, self.whole = records, int(img_size), bool(whole)
        self.labels = tokens
        self.paths = records.paths
        self.name = records.name
        if records.images is not None:
            self.images = records.images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            if self.whole:
                image = decode_whole(self.paths[i], train_side(self.img_size))
            else:
                image = decode_center(self.paths[i], self.img_size)
        except BadImageError as e:
            return skip_reason(e, self.paths[i]), self.labels[i], int(i)
        return image, self.labels[i], int(i)


class PairShards(ShardSource):
    """``keel shards`` output with captions: each sample's ``txt`` member is its caption, tokenized
    by ``encode`` (a callable ``list[str] -> (N, L)``, set once the tokenizer exists). Images
    decode as for pretraining: whole (``whole``, the default) for crops over the whole picture,
    in CPU workers, or on CUDA through nvJPEG, a batch's JPEGs in one call."""

    def __init__(self, spec: str, img_size: int, shuffle_buffer: int = 4096, whole: bool = True):
        super().__init__(spec, img_size, shuffle_buffer, whole=whole)
        self.encode = None

    def texts(self, limit: int = 0) -> list[str]:
        """The non-empty captions, read from the tar files (txt members only), for the tokenizer."""
        out = []
        for s in self.shards:       # local tars: only the txt members are read; URLs stream the shard
            for _, members in _samples(self.location, s["name"], 0, int(s["count"])):
                t = _caption(members.load(("txt",)) if isinstance(members, _Lazy) else members)
                if t:
                    out.append(t)
                    if limit and len(out) >= limit:
                        return out
        return out

    def decoder(self) -> "_PairDecoder":
        if self.encode is None:
            raise DataError("PairShards.encode is not set: train or load the tokenizer first")
        plain = super().decoder()
        return _PairDecoder(plain.side, self.img_size, plain.reduce, self.encode)


def _caption(members: dict) -> str:
    return (members.get("txt") or b"").decode("utf-8", "replace").strip()


class _PairDecoder(_Decoder):
    """The image as :class:`keel.data.shards._Decoder` decodes it, the caption's tokens as label."""

    def __init__(self, side: int | None, img_size: int, reduce: bool, encode):
        super().__init__(side, img_size, reduce)
        self.encode = encode

    def __getitem__(self, raw):
        image, _, key = super().__getitem__(raw)
        text = _caption(raw[1])
        tokens = self.encode([text or " "])[0]
        if not text and torch.is_tensor(image):
            return "empty text", tokens, key
        return image, tokens, key

    def on_device(self, raw: list, device: torch.device) -> dict:
        texts = [_caption(m) for _, m in raw]
        batch = super().on_device([r for r, t in zip(raw, texts) if t], device)
        by_key = {key: t for (key, _), t in zip(raw, texts)}
        kept = [by_key[int(k)] for k in batch["index"]]
        batch["labels"] = self.encode(kept) if kept else self.encode([" "])[:0]
        empty = [key for (key, _), t in zip(raw, texts) if not t]
        if empty:
            batch["skipped"] = torch.cat([batch["skipped"], torch.tensor(empty, dtype=torch.int64)])
            batch["reasons"] = batch["reasons"] + ["empty text"] * len(empty)
        return batch


def pair_source(source: str, image_column: str = "", text_column: str = "", img_size: int = 32,
                shuffle_buffer: int = 4096, whole: bool = True):
    """``(PairRecords, None)`` for a folder or CSV, ``(None, PairShards)`` for shards."""
    if is_shards(source):
        return None, PairShards(source, img_size, shuffle_buffer, whole)
    return read_pairs(source, image_column, text_column), None
