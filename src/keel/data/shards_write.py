"""Converting an image source into WebDataset tar shards (the ``keel shards`` command).

A source is a folder (labeled by class sub-folders or not, optionally with a ``.txt`` caption
beside each image) or a CSV with an image column and optional label/text columns. Its items are
listed in a fixed order; shard k holds items ``[k*per_shard, (k+1)*per_shard)`` and each sample's
key is its item index, so the shards do not depend on the number of processes. Images are decoded
with :func:`keel.data.decode.load_image`, downscaled so the shorter side is at most ``max_side``
and re-encoded as JPEG; bad files are dropped and listed in ``dropped.txt``.

Every finished shard is renamed into place and then recorded in ``OUT/.progress.jsonl``, so a
killed conversion, run again with the same settings, redoes only the shards without a record.
``index.json`` is written last. The format is described in the docs (``keel shards``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import tarfile
import time
from datetime import datetime, timezone
from typing import NamedTuple

from PIL import Image

from keel.files import atomic_write_text
from keel.data.decode import load_image
from keel.data.errors import BadImageError, DataError
from keel.data.pairs import IMAGE_COLUMNS, LABEL_COLUMNS, TEXT_COLUMNS
from keel.data.shards import FORMAT, VERSION, read_index
from keel.data.folders import read_exclude, _check_enough_classes, _check_labeled, _class_of, _looked_for, skip_reason, scan_images

__all__ = ["write_shards", "read_index"]

_PROGRESS, _SETTINGS, _INDEX, _DROPPED = ".progress.jsonl", ".settings.json", "index.json", "dropped.txt"


class Item(NamedTuple):
    path: str            # as stored in the sample's .json: relative to SRC, or as written in the CSV
    file: str            # absolute path of the image
    label: int           # class index, -1 when unlabeled
    caption: str | None  # the caption (CSV text column)
    caption_file: str | None  # the .txt beside the image (folder source); read by the worker
    where: str           # "line N: " for CSV rows, so reasons name the row


class Source(NamedTuple):
    items: list[Item]
    classes: list[str] | None
    text: bool
    dropped: list[tuple[str, str]]  # found while listing the source (CSV rows, images without a .txt)
    excluded: int


# ----------------------------------------------------------------------------
# Listing a source
# ----------------------------------------------------------------------------


def _folder_source(root: str, labeled: bool | None, exclude: set[str]) -> Source:
    found = scan_images(root)
    if not found:
        raise DataError(f"no image files found under '{root}' (looked for {_looked_for()}, recursively)")
    paths = [p for p in found if os.path.normpath(p) not in exclude]
    if not paths:
        raise DataError(f"every image under '{root}' is in the exclude list")
    if labeled is None:
        folders = {_class_of(p, root) for p in paths}
        labeled = None not in folders and len(folders) >= 2
    classes = None
    if labeled:
        classes = _check_labeled(root, paths)
        _check_enough_classes(root, classes)
    index = {c: k for k, c in enumerate(classes or [])}
    # Captions: a .txt of the same stem beside the image; one listing per folder, not a stat per image.
    listing: dict[str, set[str]] = {}
    for p in paths:
        d = os.path.dirname(p)
        if d not in listing:
            listing[d] = {f for f in os.listdir(d) if f.endswith(".txt")}
    txt = [os.path.splitext(os.path.basename(p))[0] + ".txt" in listing[os.path.dirname(p)] for p in paths]
    text = any(txt)
    items, dropped = [], []
    for p, has_txt in zip(paths, txt):
        rel = os.path.relpath(p, root).replace(os.sep, "/")
        if text and not has_txt:
            dropped.append((rel, "no caption"))
            continue
        label = index[_class_of(p, root)] if labeled else -1
        items.append(Item(rel, p, label, None, os.path.splitext(p)[0] + ".txt" if text else None, ""))
    return Source(items, classes, text, dropped, len(found) - len(paths))


def _column(path: str, header: list[str], names: tuple[str, ...], what: str) -> int | None:
    hits = [i for i, h in enumerate(header) if h in names]
    if len(hits) > 1:
        raise DataError(f"'{path}' has {len(hits)} {what} columns ({', '.join(header[i] for i in hits)}): keep one")
    return hits[0] if hits else None


def _csv_source(path: str, labeled: bool | None, exclude: set[str]) -> Source:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(f.strip() for f in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read '{path}' as a UTF-8 CSV file: {getattr(e, 'strerror', None) or e}") from None
    img = _column(path, header, IMAGE_COLUMNS, "image")
    if img is None:
        raise DataError(f"'{path}' has no image column ({', '.join(IMAGE_COLUMNS)}) in its header {header}")
    if "labels" in header or "primary" in header:
        raise DataError(f"'{path}' has multi-label/two-level columns; keel shards takes one 'label' per row")
    lab = _column(path, header, LABEL_COLUMNS, "label")
    txt = _column(path, header, TEXT_COLUMNS, "text")
    if labeled and lab is None:
        raise DataError(f"'{path}' has no label column ({', '.join(LABEL_COLUMNS)}), so it cannot be converted "
                        "as labeled")
    if labeled is False:
        lab = None
    base = os.path.dirname(path)
    kept, dropped, excluded = [], [], 0
    for line, row in rows:
        cell = lambda i: row[i].strip() if i is not None and i < len(row) else ""  # noqa: E731
        name, label, caption = cell(img), cell(lab), cell(txt)
        file = os.path.normpath(os.path.join(base, name))
        where = f"line {line}: "
        if not name:
            dropped.append((f"{os.path.basename(path)}:{line}", where + "no image path"))
        elif file in exclude:
            excluded += 1
        elif lab is not None and not label:
            dropped.append((name, where + "empty label"))
        elif txt is not None and not caption:
            dropped.append((name, where + "no caption"))
        elif not os.path.isfile(file):
            dropped.append((name, where + "file not found"))
        else:
            kept.append((name, file, label, caption if txt is not None else None, where))
    classes = sorted({k[2] for k in kept}) if lab is not None else None
    index = {c: k for k, c in enumerate(classes or [])}
    items = [Item(n, f, index[lb] if classes is not None else -1, c, None, w) for n, f, lb, c, w in kept]
    return Source(items, classes, txt is not None, dropped, excluded)


def list_source(src: str | os.PathLike, labeled: bool | None = None,
                exclude: str | os.PathLike | None = None) -> Source:
    """The items of ``src`` in conversion order (a folder: sorted paths; a CSV: its row order)."""
    src = os.path.abspath(os.fspath(src))
    if os.path.isdir(src):
        return _folder_source(src, labeled, read_exclude(exclude, src))
    if src.lower().endswith(".csv"):
        if not os.path.isfile(src):
            raise DataError(f"CSV file '{src}' does not exist")
        return _csv_source(src, labeled, read_exclude(exclude, os.path.dirname(src)))
    raise DataError(f"'{src}' is neither a folder nor a .csv file")


# ----------------------------------------------------------------------------
# Writing one shard (runs in a worker process)
# ----------------------------------------------------------------------------


def _encode(file: str, max_side: int, quality: int) -> tuple[bytes, int, int]:
    im = load_image(file)
    w, h = im.size
    if min(w, h) > max_side:
        if w <= h:
            size = (max_side, max(1, round(h * max_side / w)))
        else:
            size = (max(1, round(w * max_side / h)), max_side)
        # reducing_gap: a cheap integer reduce first, then LANCZOS over the last factor of 3
        im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), im.size[1], im.size[0]


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_shard(out: str, shard: int, first: int, items: list[Item], max_side: int, quality: int) -> dict:
    """Write ``shard-XXXXXX.tar`` from ``items`` (keys start at ``first``); return its record."""
    name = f"shard-{shard:06d}.tar"
    tmp = os.path.join(out, name + ".tmp")
    count, first_key, dropped, bytes_in = 0, None, [], 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for k, item in enumerate(items):
            caption = item.caption
            if item.caption_file is not None:
                try:
                    with open(item.caption_file, encoding="utf-8") as fh:
                        caption = fh.read().strip()
                except (OSError, UnicodeDecodeError) as e:
                    dropped.append((item.path, item.where + f"cannot read caption: {e}"))
                    continue
                if not caption:
                    dropped.append((item.path, item.where + "no caption"))
                    continue
            try:
                jpeg, h, w = _encode(item.file, max_side, quality)
            except BadImageError as e:
                dropped.append((item.path, item.where + skip_reason(e, item.file)))
                continue
            key = f"{first + k:09d}"
            _member(tar, key + ".jpg", jpeg)
            if item.label >= 0:
                _member(tar, key + ".cls", str(item.label).encode())
            if caption is not None:
                _member(tar, key + ".txt", caption.encode("utf-8"))
            _member(tar, key + ".json", json.dumps({"path": item.path, "size": [h, w]}).encode("utf-8"))
            count += 1
            first_key = first + k if first_key is None else first_key
            bytes_in += os.path.getsize(item.file)
    path = os.path.join(out, name)
    os.replace(tmp, path)
    return {"name": name, "count": count, "bytes": os.path.getsize(path), "items": len(items),
            "first": first if first_key is None else first_key, "dropped": dropped, "bytes_in": bytes_in}


def _run_shard(task: tuple) -> tuple[int, dict]:
    return task[1], _write_shard(*task)


# ----------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------


def _settings(src: str, source: Source, max_side: int, quality: int, per_shard: int, shuffled: bool) -> dict:
    digest = hashlib.sha256()
    for it in source.items:
        digest.update(json.dumps([it.path, it.file, it.label, it.caption, it.caption_file]).encode())
    return {"source": src, "max_side": max_side, "quality": quality, "per_shard": per_shard,
            "shuffled": shuffled, "classes": source.classes, "text": source.text, "items": len(source.items),
            "listed_dropped": len(source.dropped), "digest": digest.hexdigest()}


def _differences(old: dict, new: dict, keys) -> str:
    return ", ".join(f"{k} {old.get(k)!r} vs {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _finished(out: str, settings: dict, n_shards: int) -> dict | None:
    """The finished index.json in ``out`` when it was made with ``settings`` (DataError otherwise)."""
    index = read_index(out)
    made = {k: index.get(k, False) for k in ("source", "max_side", "quality", "per_shard", "shuffled", "classes",
                                             "text")}
    made["entries"] = index["count"] + index["dropped"]
    want = {k: settings[k] for k in made if k != "entries"}
    want["entries"] = settings["items"] + settings["listed_dropped"]
    if len(index["shards"]) != n_shards:
        made["shards"], want["shards"] = len(index["shards"]), n_shards
    diff = _differences(made, want, made)
    if diff:
        raise DataError(f"'{out}' already holds shards made with other settings ({diff}, made vs asked); "
                        "choose another output folder or delete it")
    for s in index["shards"]:
        p = os.path.join(out, s["name"])
        if not os.path.isfile(p) or os.path.getsize(p) != s["bytes"]:
            raise DataError(f"'{out}' holds a finished conversion whose {s['name']} is missing or changed; "
                            "delete the folder to convert again")
    return index


def _resume_records(out: str, settings: dict, n_shards: int) -> dict[int, dict]:
    """Finished shards of an earlier, interrupted run with the same settings."""
    settings_path, progress_path = os.path.join(out, _SETTINGS), os.path.join(out, _PROGRESS)
    if os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as fh:
            old = json.load(fh)
        diff = _differences(old, settings, settings)
        if diff:
            raise DataError(f"'{out}' holds an unfinished conversion with other settings ({diff}, then vs now); "
                            "run it again as it was, choose another output folder, or delete it")
    elif os.path.exists(progress_path) or any(f.startswith("shard-") for f in os.listdir(out)):
        raise DataError(f"'{out}' holds shards of an unknown conversion (no {_SETTINGS}); "
                        "choose another output folder or delete it")
    for f in os.listdir(out):
        if f.endswith(".tmp"):  # a shard (or index) being written when the run was killed
            os.remove(os.path.join(out, f))
    done: dict[int, dict] = {}
    if os.path.exists(progress_path):
        with open(progress_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    shard = int(rec["name"][len("shard-"):-len(".tar")])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the kill
                p = os.path.join(out, rec["name"])
                if 0 <= shard < n_shards and os.path.isfile(p) and os.path.getsize(p) == rec["bytes"]:
                    done[shard] = rec
    atomic_write_text(settings_path, json.dumps(settings, indent=1))
    return done


def write_shards(src: str | os.PathLike, out: str | os.PathLike, *, max_side: int = 256, quality: int = 90,
                 per_shard: int = 1000, labeled: bool | None = None, workers: int | None = None,
                 exclude: str | os.PathLike | None = None, progress: bool = True, shuffle: bool = True) -> dict:
    """Convert ``src`` (a folder or a CSV) into WebDataset shards in ``out``; return the index.

    ``shuffle``: the items go into the shards in a fixed random order (seed 0), not the source's:
    a folder sorted by class would give shards of one class each, and a reader's shuffle buffer
    then fills batches with few classes (measured: BENCHMARKS.md, accuracy from shards).

    The returned dict is ``index.json``'s content plus ``"run"``: what this call did
    (``converted`` items, ``seconds``, ``bytes_in`` of the written images' source files,
    ``excluded`` items, ``up_to_date``); ``run`` is not stored in ``index.json``.
    """
    for name, value, lo, hi in (("max_side", max_side, 1, None), ("quality", quality, 1, 100),
                                ("per_shard", per_shard, 1, None), ("workers", workers or 1, 1, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi and value > hi):
            raise DataError(f"{name} must be an integer from {lo}" + (f" to {hi}" if hi else "") + f", got {value!r}")
    start = time.perf_counter()
    src, out = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(out))
    source = list_source(src, labeled, exclude)
    if shuffle:
        random.Random(0).shuffle(source.items)
    if not source.items:
        reason = f" (first: {source.dropped[0][0]}: {source.dropped[0][1]})" if source.dropped else ""
        raise DataError(f"nothing to convert in '{src}': every item was dropped or excluded{reason}")
    settings = _settings(src, source, max_side, quality, per_shard, shuffle)
    n_shards = math.ceil(len(source.items) / per_shard)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the output folder '{out}': {e.strerror or e}") from None
    run = {"converted": 0, "seconds": 0.0, "bytes_in": 0, "excluded": source.excluded, "up_to_date": False}
    if os.path.exists(os.path.join(out, _INDEX)):
        index = _finished(out, settings, n_shards)
        for f in (_PROGRESS, _SETTINGS):  # killed between writing index.json and tidying up
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
        if progress:
            print(f"'{out}' is up to date: {index['count']} images in {len(index['shards'])} shards")
        return {**index, "run": {**run, "up_to_date": True}}

    done = _resume_records(out, settings, n_shards)
    tasks = [(out, k, k * per_shard, source.items[k * per_shard:(k + 1) * per_shard], max_side, quality)
             for k in range(n_shards) if k not in done]
    from tqdm import tqdm
    bar = tqdm(total=len(source.items), initial=sum(r["items"] for r in done.values()), unit="img",
               desc="shards", dynamic_ncols=True, disable=not progress)
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    progress_path = os.path.join(out, _PROGRESS)
    with open(progress_path, "a", encoding="utf-8") as log:
        pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
        try:
            results = pool.imap_unordered(_run_shard, tasks) if pool else map(_run_shard, tasks)
            for shard, rec in results:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                os.fsync(log.fileno())  # the record survives a kill only once it is on disk
                done[shard] = rec
                run["converted"] += rec["items"]
                bar.update(rec["items"])
        finally:
            if pool:
                pool.terminate()
                pool.join()
            bar.close()

    records = [done[k] for k in range(n_shards)]
    dropped = sorted(list(source.dropped) + [tuple(d) for r in records for d in r["dropped"]])
    index = {"format": FORMAT, "version": VERSION, "count": sum(r["count"] for r in records),
             "classes": source.classes, "text": source.text, "max_side": max_side, "quality": quality,
             "per_shard": per_shard, "shuffled": shuffle, "source": src,
             "shards": [{k: r[k] for k in ("name", "count", "bytes", "first")} for r in records],
             "dropped": len(dropped), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "keel": _version()}
    atomic_write_text(os.path.join(out, _DROPPED), "".join(f"{p}\t{r}\n" for p, r in dropped))
    atomic_write_text(os.path.join(out, _INDEX), json.dumps(index, indent=1) + "\n")
    for f in (_PROGRESS, _SETTINGS):
        os.remove(os.path.join(out, f))
    run.update(seconds=time.perf_counter() - start, bytes_in=sum(r["bytes_in"] for r in records))
    return {**index, "run": run}


def _version() -> str:
    from keel.version import __version__
    return __version__
