"""Reading ``keel shards`` output for training: ``data.source=shards:PATH``.

PATH is a shards folder (with its ``index.json``), a glob or brace pattern of its ``.tar`` files
(``shards/shard-{000000..000099}.tar``: part of a set), an fsspec URL of such a folder
(``s3://bucket/photos``, ``file:///data/photos``; the object store's fsspec package must be
installed), or ``pipe:COMMAND`` with ``{name}`` where a file name goes (``pipe:aws s3 cp
s3://bucket/photos/{name} -``). index.json gives every shard's sample count, so an epoch is planned
before a byte is read:

* the shards are put in an order drawn from (seed, epoch) and laid end to end; process r of W reads
  the r-th of W equal, contiguous runs of samples (a shard at a boundary is split at a sample, each
  process reading only its part), so processes read disjoint samples and all of them take exactly
  ``count // batch`` steps, whatever the shard counts;
* a process shuffles its run through a buffer (``data.shuffle_buffer`` samples) seeded from
  (seed, epoch, rank) and cuts it into batches; DataLoader workers only decode (or the GPU does,
  with nvJPEG, when training on CUDA);
* resuming at step s of an epoch replays the plan and the buffer without decoding (a local file's
  samples are not even read until they leave the buffer), so the run continues with exactly the
  batch an unbroken run would have seen next.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
import random
import re
import shlex
import subprocess
import tarfile
from collections.abc import Iterator
from typing import Any

import torch

from keel.data.batches import finish_batch
from keel.data.decode import (_check_jpeg_end, _decode_jpeg_tv, _is_jpeg, decode_center, decode_whole, fit_side,
                              train_side)
from keel.data.errors import BadImageError, DataError
from keel.data.folders import skip_reason, collate_skip

__all__ = ["PREFIX", "FORMAT", "VERSION", "is_shards", "read_index", "ShardSource"]

PREFIX = "shards:"
FORMAT, VERSION = "keel-shards", 1
INDEX = "index.json"


def is_shards(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def _is_url(location: str) -> bool:
    return location.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def _open(location: str, name: str):
    """A readable binary stream of ``name`` in the shards folder ``location`` (local, fsspec or pipe)."""
    if location.startswith("pipe:"):
        cmd = location[len("pipe:"):].replace("{name}", shlex.quote(name))
        return subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20).stdout
    if _is_url(location):
        import fsspec
        return fsspec.open(location.rstrip("/") + "/" + name, "rb").open()
    return open(os.path.join(location, name), "rb")


def read_index(location: str | os.PathLike) -> dict:
    """Load and check ``index.json`` of a shards folder (``location``: the folder, the file itself,
    an fsspec URL or a pipe: command)."""
    location = os.fspath(location)
    if not _is_url(location) and os.path.isfile(location):
        location, name = os.path.dirname(location) or ".", os.path.basename(location)
    else:
        name = INDEX
    where = location if location.startswith("pipe:") else os.path.join(location, name)
    try:
        with _open(location, name) as fh:
            index = json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"'{where}' does not exist: not a finished keel shards folder (make one with "
                        "keel shards SRC OUT)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read '{where}' as a keel shards index: {str(e).splitlines()[0] if str(e) else e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"'{where}' is not a keel shards index (no \"format\": \"{FORMAT}\")")
    if index.get("version") != VERSION:
        raise DataError(f"'{where}' is keel shards format version {index.get('version')!r}; this keel reads {VERSION}")
    missing = [k for k in ("count", "classes", "text", "shards", "dropped", "max_side", "per_shard") if k not in index]
    if missing or not isinstance(index["shards"], list) or any(
            not isinstance(s, dict) or not {"name", "count", "bytes", "first"} <= set(s) for s in index["shards"]):
        raise DataError(f"'{where}' is a damaged keel shards index (missing {missing or 'shard fields'})")
    return index


def _resolve(spec: str) -> tuple[str, dict, list[dict]]:
    """(folder location, its index, the shards the spec names) for ``shards:...``."""
    location = os.path.expanduser(spec[len(PREFIX):] if spec.startswith(PREFIX) else spec)
    if not location:
        raise DataError("data.source=shards: needs a path, e.g. shards:/data/photos-shards")
    if location.startswith("pipe:") or _is_url(location) or os.path.isdir(location):
        index = read_index(location)
        return location, index, index["shards"]
    # a pattern of tar files: its folder's index, restricted to the files the pattern names
    from webdataset.shardlists import expand_urls
    names = sorted({os.path.normpath(p) for pattern in expand_urls(location) for p in glob.glob(pattern) or [pattern]})
    folders = {os.path.dirname(p) for p in names}
    if len(folders) != 1:
        raise DataError(f"shards:{location}: the files must be in one folder (found {len(folders)})")
    folder = folders.pop() or "."
    index = read_index(folder)
    by_name = {s["name"]: s for s in index["shards"]}
    unknown = [os.path.basename(p) for p in names if os.path.basename(p) not in by_name]
    if unknown:
        raise DataError(f"shards:{location}: {unknown[0]} is not in '{os.path.join(folder, INDEX)}'"
                        + (" (no such file)" if not os.path.exists(names[0]) else ""))
    return folder, index, [by_name[os.path.basename(p)] for p in names]


# ------------------------------------------------------------------------------- reading samples
class _Lazy:
    """A local sample's members, read only when it leaves the shuffle buffer (resume skips the
    samples it replays without reading them)."""
    __slots__ = ("path", "members")

    def __init__(self, path: str, members: list[tuple[str, int, int]]):
        self.path, self.members = path, members

    def load(self, only: tuple[str, ...] = ()) -> dict[str, bytes]:
        """The members' bytes (``only``: just these extensions)."""
        with open(self.path, "rb") as fh:
            out = {}
            for ext, offset, size in self.members:
                if only and ext not in only:
                    continue
                fh.seek(offset)
                out[ext] = fh.read(size)
            return out


def _samples(location: str, name: str, start: int, stop: int) -> Iterator[tuple[int, Any]]:
    """(key, members) of samples [start, stop) of one shard, in order; members a dict of bytes, or a
    :class:`_Lazy` for a local file (its headers are walked, the data seeked over)."""
    local = not _is_url(location)
    stream = None if local else _open(location, name)
    try:
        tf = tarfile.open(os.path.join(location, name), "r:") if local else tarfile.open(fileobj=stream, mode="r|")
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"cannot read shard '{name}' in '{location}': {e}") from None
    path = os.path.join(location, name)
    position, key, members = -1, None, None
    with tf:
        for info in tf:
            if not info.isfile():
                continue
            stem, _, ext = info.name.rpartition("/")[2].partition(".")
            if stem != key:
                if key is not None and start <= position < stop:
                    yield int(key), _Lazy(path, members) if local else members
                position, key = position + 1, stem
                if position >= stop:
                    return
                members = [] if local else {}
            if position < start:
                continue
            if local:
                members.append((ext, info.offset_data, info.size))
            else:
                members[ext] = tf.extractfile(info).read()
        if key is not None and start <= position < stop:
            yield int(key), _Lazy(path, members) if local else members


def _shuffled(pieces, location: str, buffer: int, rng: random.Random) -> Iterator[tuple[int, Any]]:
    """webdataset's shuffle buffer, seeded: each incoming sample takes the place of a random one,
    which goes out; the rest leave in random order at the end."""
    held: list = []
    for name, start, stop in pieces:
        for sample in _samples(location, name, start, stop):
            if len(held) < buffer:
                held.append(sample)
                continue
            j = rng.randrange(buffer)
            held[j], sample = sample, held[j]
            yield sample
    rng.shuffle(held)
    yield from held


# ------------------------------------------------------------------------------- the data source
class ShardSource:
    """Training data from keel shards (see the module's docstring). ``len()`` is the sample count;
    the trainer asks :meth:`steps_per_epoch` and iterates :meth:`stream`."""

    def __init__(self, spec: str, img_size: int, shuffle_buffer: int = 4096, whole: bool = True):
        self.spec = spec
        self.location, self.index, self.shards = _resolve(spec)
        self.img_size, self.whole = int(img_size), bool(whole)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.classes = list(self.index["classes"] or [])
        self.name = os.path.basename(self.location.rstrip("/")) or self.location
        self.count = sum(int(s["count"]) for s in self.shards)
        if self.count == 0:
            raise DataError(f"{spec}: the shards hold no image")
        self._firsts = [int(s["first"]) for s in self.index["shards"]]

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"ShardSource({self.spec!r}, shards={len(self.shards)}, n={self.count}, classes={len(self.classes)})"

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.count // batch_size

    def name_of(self, key: int) -> str:
        """'shard-000003.tar/000003141' for skipped.txt."""
        k = bisect.bisect_right(self._firsts, key) - 1
        return f"{self.index['shards'][max(k, 0)]['name']}/{key:09d}"

    def plan(self, epoch: int, seed: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[str, int, int]]:
        """(shard, first sample, end) pieces process ``rank`` reads in ``epoch``: its run of
        ``steps * batch_size / world`` samples of the shards laid end to end in a seeded order."""
        from keel.engine.distributed import seed_for
        if batch_size % world:
            raise DataError(f"train.batch_size {batch_size} is not divisible by {world} processes (shards "
                            "give every process the same share)")
        g = torch.Generator().manual_seed(seed_for(seed, epoch))
        order = torch.randperm(len(self.shards), generator=g).tolist()
        share = self.steps_per_epoch(batch_size) * (batch_size // world)
        begin, end = rank * share, (rank + 1) * share
        pieces, at = [], 0
        for i in order:
            s = self.shards[i]
            n = int(s["count"])
            lo, hi = max(begin, at), min(end, at + n)
            if lo < hi:
                pieces.append((s["name"], lo - at, hi - at))
            at += n
            if at >= end:
                break
        return pieces

    def raw_batches(self, epoch: int, seed: int, batch_size: int, rank: int = 0, world: int = 1,
                    skip: int = 0) -> Iterator[list[tuple[int, dict]]]:
        """This process's batches of epoch ``epoch`` from step ``skip`` on, as (key, members)."""
        from keel.engine.distributed import seed_for
        local = batch_size // world
        rng = random.Random(seed_for(seed, epoch, rank))
        samples = _shuffled(self.plan(epoch, seed, batch_size, rank, world), self.location,
                            self.shuffle_buffer, rng)
        for _ in range(skip * local):       # replayed, never decoded (nor read, for local files)
            next(samples)
        batch = []
        for key, members in samples:
            batch.append((key, members.load() if isinstance(members, _Lazy) else members))
            if len(batch) == local:
                yield batch
                batch = []

    def stream(self, epoch: int, skip: int, batch_size: int, seed: int, rank: int, world: int,
               device: torch.device, num_workers: int = 2, skipped: dict | None = None) -> Iterator[dict]:
        """Batches for the trainer, on ``device``: ``images`` (a canvas when sizes differ, with
        ``sizes``), ``labels`` (-1 without classes), ``global_size``; undecodable samples go to
        ``skipped`` and the batch is refilled with its decodable images."""
        raws = self.raw_batches(epoch, seed, batch_size, rank, world, skip)
        decode = self.decoder()
        if device.type == "cuda":
            batches = (decode.on_device(raw, device) for raw in raws)
        else:
            loader = torch.utils.data.DataLoader(decode, batch_sampler=raws, num_workers=num_workers,
                                                 collate_fn=collate_skip)
            batches = iter(loader)
        for batch in batches:
            out = finish_batch(batch, batch_size // world, device, refill=True, skipped=skipped)
            out["global_size"] = batch_size
            yield out


    def decoder(self) -> "_Decoder":
        side = train_side(self.img_size) if self.whole else None
        # stored images under twice the side never need libjpeg's reduced-size decode
        return _Decoder(side, self.img_size, reduce=side is None or int(self.index["max_side"]) >= 2 * side)


class _Decoder(torch.utils.data.Dataset):
    """Decodes one raw sample (its index *is* the sample: the batch sampler hands samples out)."""

    def __init__(self, side: int | None, img_size: int, reduce: bool = True):
        self.side, self.img_size, self.reduce = side, img_size, reduce
        self.fallbacks = 0      # batches nvJPEG refused as a whole (the tests read it)

    def __len__(self) -> int:        # pragma: no cover - the batch sampler decides
        return 0

    def __getitem__(self, raw: tuple[int, dict]):
        key, members = raw
        label = _label(members)
        image = members.get("jpg") or members.get("jpeg") or members.get("png") or members.get("webp")
        if image is None:
            return "no image in the sample", label, key
        try:
            if self.side is None:
                return decode_center(f"{key:09d}", self.img_size, image), label, key
            return decode_whole(f"{key:09d}", self.side, image, self.reduce), label, key
        except BadImageError as e:
            return skip_reason(e, f"{key:09d}"), label, key

    def on_device(self, raw: list[tuple[int, dict]], device: torch.device) -> dict:
        """One batch decoded by nvJPEG on ``device`` (its JPEGs in one call); other formats, and
        JPEGs nvJPEG refuses, through the CPU path."""
        items: list = [None] * len(raw)
        jpegs = [i for i, (_, m) in enumerate(raw) if self.side is not None and _is_jpeg(m.get("jpg") or b"")]
        try:
            for i in jpegs:
                _check_jpeg_end(f"{raw[i][0]:09d}", raw[i][1]["jpg"])
            decoded = _decode_jpeg_tv([raw[i][1]["jpg"] for i in jpegs], device=str(device)) if jpegs else []
            for i, image in zip(jpegs, decoded):
                items[i] = (fit_side(image, self.side), _label(raw[i][1]), raw[i][0])
        except (OSError, RuntimeError):  # one bad file fails the batch call: judge each file on the CPU
            self.fallbacks += 1
        items = [it if it is not None else self._to(self[r], device) for it, r in zip(items, raw)]
        return collate_skip(items)

    @staticmethod
    def _to(item: tuple, device: torch.device) -> tuple:
        image, label, key = item
        return (image.to(device) if torch.is_tensor(image) else image), label, key


def _label(members: dict) -> int:
    cls = members.get("cls")
    try:
        return int(cls) if cls is not None else -1
    except ValueError:
        return -1
