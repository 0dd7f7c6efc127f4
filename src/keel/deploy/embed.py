"""``keel embed``: the embedding of every image of a folder, a built-in dataset or keel shards,
written in chunks a user opens with numpy and pandas, and read back by ``keel search``/``keel dedup``.

An embeddings folder holds, per chunk of ``chunk_size`` source images (in source order: a folder's
sorted paths, a built-in's rows, the shards' samples in index order):

* ``embeddings-00000.npy``: float32 (or float16) (n, D), L2-normalised unless asked otherwise
  (``np.load(path, mmap_mode="r")``);
* ``paths-00000.csv``: the n images' names, one row each in the same order (``pandas.read_csv``):
  column ``path`` (a folder: the absolute file path; shards: ``shard-000003.tar/000003141``;
  a built-in: ``digits:train:17``) and, for shards, ``source`` (the path ``keel shards`` read);

then ``index.json`` (model, dim, count, chunks, normalised or not) and ``skipped.txt`` (images that
could not be decoded: ``name<TAB>reason``). Images are seen as evaluation sees them: resized so
the shorter side is the backbone's image size (a JPEG at least 4x larger is decoded at a reduced
scale first, never below 2x), centre-cropped and normalised.

A chunk is written whole (temporary file, then renamed) and then recorded in ``.progress/``, so a
killed run, started again with the same arguments, embeds only the chunks without a record; its
files equal an unbroken run's. Under torchrun, process r of W embeds chunks r, r+W, ...; rank 0
writes ``index.json`` once every chunk is there.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.files import atomic_write_with
from keel.data.decode import decode_center
from keel.data.errors import BadImageError, DataError
from keel.data.folders import ImageFolder, skip_reason

__all__ = ["FORMAT", "VERSION", "embed", "embed_files", "read_index", "open_image", "chunk_files"]

FORMAT, VERSION = "keel-embeddings", 1
INDEX, SETTINGS, FILES, PROGRESS, SKIPPED = "index.json", ".settings.json", ".files.json", ".progress", "skipped.txt"
DTYPES = ("float32", "float16")


def chunk_files(c: int) -> tuple[str, str]:
    return f"embeddings-{c:05d}.npy", f"paths-{c:05d}.csv"


# ------------------------------------------------------------------------------- data sources
class _FolderData:
    """Every image file under a folder (recursive; split sub-folders included), listed once into
    OUT/.files.json so a resumed run cuts the same chunks."""
    kind, columns = "folder", ("path",)

    def __init__(self, root: str, img_size: int, files_json: Path):
        from keel.data.sources import _cached_files
        self.spec = os.path.abspath(root)
        self.ds = _EvalFolder(self.spec, img_size, paths=_cached_files(self.spec, files_json))
        self.count = len(self.ds)

    def batches(self, ranges, batch_size, num_workers, device):
        from keel.data.batches import load_batches
        idx = [b for lo, hi in ranges for b in torch.arange(lo, hi).split(batch_size)]
        skipped: dict[int, str] = {}
        paths = self.ds.paths
        for batch in load_batches(self.ds, idx, device, num_workers, skipped=skipped, index=True):
            bad = [(paths[i], why) for i, why in sorted(skipped.items())]
            skipped.clear()
            yield batch["images"], [[paths[i]] for i in batch["index"].tolist()], bad


class _MemoryData:
    """A built-in dataset (digits, fashion-mnist), one split."""
    kind, columns = "builtin", ("path",)

    def __init__(self, name: str, split: str, img_size: int):
        from keel.data.sources import build_dataset
        self.spec, self.split = name, split
        self.ds = build_dataset(name, split, img_size)
        self.count = len(self.ds)

    def batches(self, ranges, batch_size, num_workers, device):
        from keel.data.batches import load_batches
        idx = [b for lo, hi in ranges for b in torch.arange(lo, hi).split(batch_size)]
        for batch in load_batches(self.ds, idx, device, 0, index=True):
            yield batch["images"], [[f"{self.spec}:{self.split}:{i}"] for i in batch["index"].tolist()], []


class _ShardData:
    """keel shards, read in index order (no shuffling: positions are what chunks are cut by)."""
    kind, columns = "shards", ("path", "source")

    def __init__(self, spec: str, img_size: int):
        from keel.data.shards import ShardSource
        self.src = ShardSource(spec, img_size, shuffle_buffer=1, whole=False)
        location = self.src.location
        absolute = location if location.startswith("pipe:") or "://" in location else os.path.abspath(location)
        self.spec = "shards:" + absolute
        self.img_size, self.count = img_size, self.src.count
        self.starts = np.cumsum([0] + [int(s["count"]) for s in self.src.shards]).tolist()

    def _raw(self, lo: int, hi: int) -> Iterator[tuple[int, dict]]:
        from keel.data.shards import _Lazy, _samples
        for i, s in enumerate(self.src.shards):
            a, b = max(lo, self.starts[i]), min(hi, self.starts[i + 1])
            if a < b:
                for key, members in _samples(self.src.location, s["name"], a - self.starts[i], b - self.starts[i]):
                    yield key, members.load() if isinstance(members, _Lazy) else members

    def batches(self, ranges, batch_size, num_workers, device):
        from keel.data.folders import collate_skip
        sources: dict[int, str] = {}

        def raw_batches():
            for lo, hi in ranges:
                batch = []
                for key, members in self._raw(lo, hi):
                    sources[key] = _source_path(members)
                    batch.append((key, members))
                    if len(batch) == batch_size:
                        yield batch
                        batch = []
                if batch:
                    yield batch
        # the batch sampler runs here and hands whole samples (their bytes) to the workers to decode
        loader = torch.utils.data.DataLoader(self.src.decoder(), batch_sampler=raw_batches(),
                                             num_workers=num_workers, collate_fn=collate_skip,
                                             pin_memory=device.type == "cuda")
        name = self.src.name_of
        for b in loader:
            rows = [[name(k), sources.pop(k)] for k in b["index"].tolist()]
            bad = [(name(k), why) for k, why in zip(b["skipped"].tolist(), b["reasons"])]
            for k in b["skipped"].tolist():
                sources.pop(k, None)
            yield b["images"].to(device, non_blocking=True), rows, bad


def _source_path(members: dict) -> str:
    try:
        return str(json.loads(members["json"])["path"])
    except (KeyError, ValueError, TypeError):
        return ""


class _EvalFolder(ImageFolder):
    """An ImageFolder that decodes big JPEGs at a reduced scale (libjpeg's DCT scaling) before
    the evaluation resize: a 12-megapixel photo costs a fraction of a full decode."""

    def __init__(self, root: str, img_size: int, paths: list[str]):
        super().__init__(root, img_size, labeled=False, paths=paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            # draft keeps both sides >= 2 * img_size, so the bilinear resize still has the pixels
            return decode_center(path, self.img_size, draft=(2 * self.img_size, 2 * self.img_size)), -1, int(i)
        except BadImageError as e:
            return skip_reason(e, path), -1, int(i)


def _kind_of(data: str) -> str:
    """shards, builtin or folder; a one-line error for anything else (checked by every process
    before rank 0 lists a folder, so that none waits for a rank that failed)."""
    from keel.data.shards import is_shards
    from keel.data.sources import builtin_names, is_fashion_dir
    if is_shards(data):
        return "shards"
    path = os.path.expanduser(data)
    if data in builtin_names() or (os.path.isdir(path) and is_fashion_dir(path)):
        return "builtin"
    if not os.path.exists(path):
        raise DataError(f"--data '{data}' does not exist (and is not a built-in dataset: {', '.join(builtin_names())} "
                        "nor shards:PATH)")
    if not os.path.isdir(path):
        raise DataError(f"--data '{data}' is a file: give a folder of images, a built-in name or shards:PATH")
    return "folder"


def _open_data(data: str, img_size: int, split: str, out: Path):
    kind = _kind_of(data)
    if kind == "shards":
        return _ShardData(data, img_size)
    if kind == "builtin":
        return _MemoryData(data, split, img_size)
    return _FolderData(os.path.expanduser(data), img_size, out / FILES)


# ------------------------------------------------------------------------------- the model
def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the weights, so search can check its queries meet the model the index was made with."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model(checkpoint: str, img_size: int | None = None) -> tuple[nn.Module, int, str, str]:
    """(backbone in eval mode, image side, model name, spec with absolute paths) of a spec."""
    from keel import hub
    model, size = hub.resolve_backbone(checkpoint, img_size, arg="--checkpoint")
    name, _ = hub.model_of(checkpoint, "--checkpoint")
    return model.eval(), size, name, _absolute_spec(checkpoint)


def _absolute_spec(spec: str) -> str:
    """The spec with its file part made absolute, so it still resolves from another directory."""
    if spec.startswith("random:"):
        return spec
    if spec.startswith("timm:"):
        _, model, path = spec.split(":", 2)
        return f"timm:{model}:{os.path.abspath(os.path.expanduser(path))}"
    return os.path.abspath(os.path.expanduser(spec))


@torch.inference_mode()
def _forward(model: nn.Module, images: torch.Tensor, img_size: int, amp: bool) -> torch.Tensor:
    from keel.evaluate.frozen import make_eval_transform
    x = make_eval_transform(img_size)(images)
    if amp:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return model.embed(x).float()
    return model.embed(x).float()


def embed_files(model: nn.Module, img_size: int, paths: list[str], batch_size: int = 64,
                device: str | torch.device = "cpu", normalize: bool = True):
    """Embeddings of image files (search's queries) -> (float32 (n, D) numpy, the paths embedded,
    [(path, reason)] of those that could not be decoded)."""
    device = torch.device(device)
    ds = _EvalFolder(os.path.dirname(paths[0]) or ".", img_size, paths=list(paths))
    feats, kept, bad = [], [], []
    skipped: dict[int, str] = {}
    from keel.data.batches import load_batches
    for batch in load_batches(ds, torch.arange(len(paths)).split(batch_size), device, 0, skipped=skipped, index=True):
        if len(batch["images"]):
            z = _forward(model, batch["images"], img_size, False)
            feats.append(F.normalize(z, dim=1) if normalize else z)
            kept += [paths[i] for i in batch["index"].tolist()]
    bad = [(paths[i], why) for i, why in sorted(skipped.items())]
    dim = feats[0].shape[1] if feats else 0
    return (torch.cat(feats).cpu().numpy() if feats else np.zeros((0, dim), np.float32)), kept, bad


# ------------------------------------------------------------------------------- writing
def _write_chunk(out: Path, c: int, feats: np.ndarray, columns: tuple[str, ...], rows: list[list[str]],
                 skipped: list[tuple[str, str]], seconds: float) -> None:
    """The chunk's two files, then its record: a chunk with a record is complete."""
    npy, names = chunk_files(c)
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    atomic_write_with(out / npy, lambda fh: np.save(fh, feats), binary=True)

    def write_rows(fh):
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerows(rows)
    atomic_write_with(out / names, write_rows)
    record = {"chunk": c, "count": len(rows), "skipped": skipped, "seconds": round(seconds, 3)}
    atomic_write_with(out / PROGRESS / f"chunk-{c:05d}.json", lambda fh: fh.write(json.dumps(record)))


def _done(out: Path, c: int) -> dict | None:
    try:
        return json.loads((out / PROGRESS / f"chunk-{c:05d}.json").read_text())
    except (OSError, ValueError):
        return None


def _check_settings(out: Path, settings: dict, is_main: bool) -> None:
    """Write the settings of a new run; a run to resume must have been started with the same."""
    from keel.engine.distributed import barrier
    path = out / SETTINGS
    if is_main and not path.exists():
        atomic_write_with(path, lambda fh: fh.write(json.dumps(settings, indent=1)))
    barrier()
    old = json.loads(path.read_text())
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise DataError(f"'{out}' holds embeddings made with another {', '.join(diff)}: "
                        "give another --out, or delete it to start again")


def _finish(out: Path, settings: dict, n_chunks: int, dim: int, started: float) -> dict:
    chunks, skipped, first = [], [], 0
    for c in range(n_chunks):
        rec = _done(out, c)
        if rec is None:
            raise DataError(f"chunk {c} of '{out}' is missing: a process stopped early; run the command again")
        npy, names = chunk_files(c)
        chunks.append({"embeddings": npy, "paths": names, "count": rec["count"], "first": first})
        first += rec["count"]
        skipped += rec["skipped"]
    index = {"format": FORMAT, "version": VERSION, **settings, "dim": dim, "count": first,
             "skipped": len(skipped), "chunks": chunks,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - started, 1)}
    atomic_write_with(out / SKIPPED, lambda fh: fh.write("".join(f"{p}\t{r}\n" for p, r in skipped)))
    atomic_write_with(out / INDEX, lambda fh: fh.write(json.dumps(index, indent=1) + "\n"))
    return index


# ------------------------------------------------------------------------------- the command
def embed(checkpoint: str, data: str, out: str | os.PathLike, *, batch_size: int = 64, chunk_size: int = 50_000,
          dtype: str = "float32", normalize: bool = True, img_size: int | None = None, split: str = "train",
          device: str = "auto", num_workers: int = 2, amp: bool = False, progress: bool = True,
          model: nn.Module | None = None) -> dict:
    """Embed every image of ``data`` with the backbone ``checkpoint`` (a run directory, timm:...,
    random:...) into the folder ``out`` (see the module docstring). Returns index.json's content
    plus ``run``: what this call did (``embedded`` images, ``seconds``, ``up_to_date``).
    ``model``: any module with ``embed(x) -> (B, D)`` instead (``checkpoint`` is then only its name,
    and ``img_size`` is needed); ``keel search`` cannot rebuild it to embed queries."""
    from tqdm.auto import tqdm

    from keel.engine.distributed import barrier, init_distributed, main_first
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"--batch-size and --chunk-size must be at least 1 (got {batch_size}, {chunk_size})")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    started = time.time()
    owns_group = not torch.distributed.is_initialized()
    info = init_distributed(device)
    try:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / PROGRESS).mkdir(exist_ok=True)
        if model is None:
            model, size, name, spec = load_model(checkpoint, img_size)
        elif img_size is None:
            raise ValueError("embed(model=...) needs img_size: the side the model takes")
        else:
            model, size, name, spec = model.eval(), int(img_size), checkpoint or type(model).__name__, None
        fingerprint = model_fingerprint(model)
        model.to(info.device)
        _kind_of(data)
        with main_first():      # the folder is walked by rank 0 alone; the others read its list
            source = _open_data(data, size, split, out)
        if source.count == 0:
            raise DataError(f"--data '{data}' holds no image")
        settings = {"model": name, "checkpoint": spec, "model_sha256": fingerprint, "img_size": size,
                    "data": source.spec, "kind": source.kind, "split": split if source.kind == "builtin" else None,
                    "source_count": source.count, "chunk_size": chunk_size, "dtype": dtype, "normalized": normalize,
                    "columns": list(source.columns)}
        _check_settings(out, settings, info.is_main)
        n_chunks = math.ceil(source.count / chunk_size)
        with torch.inference_mode():
            dim = int(model.embed(torch.zeros(1, 3, size, size, device=info.device)).shape[1])
        index_path = out / INDEX
        if index_path.is_file() and all(_done(out, c) for c in range(n_chunks)):
            index = json.loads(index_path.read_text())
            return {**index, "run": {"embedded": 0, "seconds": 0.0, "up_to_date": True}}
        todo = [c for c in range(info.rank, n_chunks, info.world_size) if _done(out, c) is None]
        ranges = [(c * chunk_size, min((c + 1) * chunk_size, source.count)) for c in todo]
        total = sum(hi - lo for lo, hi in ranges)
        bar = tqdm(total=total, unit="img", desc="embed", dynamic_ncols=True, disable=not (progress and info.is_main))
        batches = source.batches(ranges, batch_size, num_workers, info.device)
        t0, embedded = time.perf_counter(), 0
        for c, (lo, hi) in zip(todo, ranges):
            chunk_start = time.perf_counter()
            feats, rows, skipped = [], [], []
            for _ in range(math.ceil((hi - lo) / batch_size)):     # batches never cross a chunk's end
                images, names, bad = next(batches)
                if len(images):
                    feats.append(_forward(model, images, size, amp))
                rows += names
                skipped += bad
                bar.update(len(names) + len(bad))
            z = torch.cat(feats) if feats else torch.zeros(0, dim, device=info.device)
            z = F.normalize(z, dim=1) if normalize else z
            _write_chunk(out, c, z.cpu().numpy().astype(dtype), source.columns, rows, skipped,
                         time.perf_counter() - chunk_start)
            embedded += hi - lo
        bar.close()
        seconds = time.perf_counter() - t0
        barrier()
        if info.is_main:
            index = _finish(out, settings, n_chunks, dim, started)
        barrier()
        if not info.is_main:
            index = json.loads(index_path.read_text())
        return {**index, "run": {"embedded": embedded, "seconds": seconds, "up_to_date": False}}
    finally:
        if owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------- reading back
def read_index(folder: str | os.PathLike) -> dict:
    """Load and check an embeddings folder's index.json (``folder`` key added: its absolute path)."""
    folder = Path(folder).expanduser()
    path = folder / INDEX
    if not path.is_file():
        started = (folder / SETTINGS).exists()
        hint = " (a run still going or stopped: run keel embed again to finish it)" if started else ""
        raise DataError(f"'{folder}' is not a finished keel embed folder: no index.json{hint}")
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"cannot read '{path}': {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"'{path}' is not a keel embeddings index (no \"format\": \"{FORMAT}\")")
    if index.get("version") != VERSION:
        raise DataError(f"'{path}' is keel embeddings version {index.get('version')!r}; this keel reads {VERSION}")
    index["folder"] = str(folder.resolve())
    return index


@functools.lru_cache(maxsize=2)
def _builtin_images(source: str, split: str, side: int) -> torch.Tensor:
    from keel.data.sources import build_dataset
    return build_dataset(source, split, side).images


def open_image(index: dict, name: str, side: int) -> torch.Tensor:
    """An indexed image by its ``path`` entry as uint8 (3, side, side) for pictures (resized and
    centre-cropped); a grey square when it can no longer be read."""
    try:
        if index["kind"] == "folder":
            return decode_center(name, side)
        if index["kind"] == "builtin":
            source, split, i = name.rsplit(":", 2)
            return _builtin_images(source, split, side)[int(i)]
        from keel.data.shards import ShardSource, _Lazy, _samples
        src = ShardSource(index["data"], side)
        shard, key = name.split("/")
        count = next(int(s["count"]) for s in src.index["shards"] if s["name"] == shard)
        for k, members in _samples(src.location, shard, 0, count):
            if k == int(key):
                members = members.load() if isinstance(members, _Lazy) else members
                data = members.get("jpg") or members.get("jpeg") or members.get("png") or members.get("webp")
                return decode_center(name, side, data)
        raise BadImageError(f"no sample {key} in {shard}")
    except (BadImageError, DataError, OSError, ValueError, StopIteration):
        return torch.full((3, side, side), 128, dtype=torch.uint8)
