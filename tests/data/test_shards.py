"""Reading keel shards: the epoch plan, the seeded shuffle, exact resume, decoding and sources."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from keel.data.decode import decode_whole
from keel.data.errors import DataError
from keel.data.shards import ShardSource, _Decoder, _Lazy, read_index
from keel.data.shards_write import write_shards


def _photo_folder(root, n=40, seed=0):
    """n images of several sizes and shapes in 2 class folders; the colour encodes the index."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = [(30, 40), (40, 30), (24, 24), (20, 50)][i % 4]
        arr = np.zeros((h, w, 3), np.uint8) + np.array([i * 6 % 256, 255 - i * 6 % 256, 128], np.uint8)
        arr[: h // 3] = rng.integers(0, 256, size=(h // 3, w, 3), dtype=np.uint8)   # some texture
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / f"c{i % 2}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(_photo_folder(root / "src"), root / "out", per_shard=7, workers=1, progress=False)
    return root / "out"      # 40 images in shards of 7, 7, 7, 7, 7, 5


def _keys(batches):
    return [[k for k, _ in b] for b in batches]


def test_plan_gives_every_process_equal_disjoint_runs(shards):
    src = ShardSource(f"shards:{shards}", img_size=16)
    assert len(src) == 40 and [s["count"] for s in src.shards] == [7, 7, 7, 7, 7, 5]
    for world, batch in [(1, 8), (2, 8), (3, 6), (4, 12)]:
        steps = src.steps_per_epoch(batch)
        assert steps == 40 // batch
        seen = []
        for rank in range(world):
            pieces = src.plan(epoch=1, seed=0, batch_size=batch, rank=rank, world=world)
            assert sum(b - a for _, a, b in pieces) == steps * batch // world   # same steps on every rank
            seen += [(name, i) for name, a, b in pieces for i in range(a, b)]
            keys = _keys(src.raw_batches(1, 0, batch, rank, world))
            assert len(keys) == steps and all(len(k) == batch // world for k in keys)
        assert len(seen) == len(set(seen)) == steps * batch                      # disjoint


def test_order_is_seeded_by_seed_and_epoch_and_shuffled_within_shards(shards):
    src = ShardSource(f"shards:{shards}", img_size=16, shuffle_buffer=10)
    a = _keys(src.raw_batches(0, 0, 8))
    assert a == _keys(src.raw_batches(0, 0, 8))                  # same (seed, epoch): same batches
    assert a != _keys(src.raw_batches(1, 0, 8))                  # another epoch: another order
    assert a != _keys(src.raw_batches(0, 1, 8))                  # another seed too
    flat = [k for b in a for k in b]
    assert sorted(flat) == list(range(40)) and flat != sorted(flat)   # 40 = 5 batches: each sample once
    unshuffled = ShardSource(f"shards:{shards}", img_size=16, shuffle_buffer=1)
    order = [k for b in _keys(unshuffled.raw_batches(0, 0, 8)) for k in b]
    first = {sh["name"]: sh["first"] for sh in unshuffled.shards}
    planned = [first[name] + i for name, a, b in unshuffled.plan(0, 0, 8) for i in range(a, b)]
    assert order == planned                                      # buffer 1: the plan's shards, in order


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_resume_mid_epoch_gives_exactly_the_next_batches(shards, world, rank, monkeypatch):
    src = ShardSource(f"shards:{shards}", img_size=16, shuffle_buffer=9)
    whole = list(src.raw_batches(3, 5, 8, rank, world))
    loads = []
    real = _Lazy.load
    monkeypatch.setattr(_Lazy, "load", lambda self: loads.append(1) or real(self))
    resumed = list(src.raw_batches(3, 5, 8, rank, world, skip=2))
    assert resumed == whole[2:]                                   # bytes and keys, batch for batch
    assert len(loads) == sum(len(b) for b in resumed)            # the skipped samples were never read


def test_url_and_pipe_sources_read_the_same_stream(shards):
    local = list(ShardSource(f"shards:{shards}", 16, shuffle_buffer=5).raw_batches(0, 0, 8, skip=1))
    url = list(ShardSource(f"shards:file://{shards}", 16, shuffle_buffer=5).raw_batches(0, 0, 8, skip=1))
    pipe = list(ShardSource(f"shards:pipe:cat {shards}/{{name}}", 16, shuffle_buffer=5).raw_batches(0, 0, 8, skip=1))
    assert local == url == pipe


def test_patterns_pick_part_of_a_set_and_bad_specs_are_one_line_errors(shards, tmp_path):
    brace = ShardSource(f"shards:{shards}/shard-{{000000..000001}}.tar", 16)
    glob_ = ShardSource(f"shards:{shards}/shard-00000[2-3].tar", 16)
    assert len(brace) == 14 and [s["name"] for s in glob_.shards] == ["shard-000002.tar", "shard-000003.tar"]
    keys = {k for b in brace.raw_batches(0, 0, 7) for k, _ in b}
    assert keys == set(range(14))
    with pytest.raises(DataError, match="keel shards"):
        ShardSource(f"shards:{tmp_path}", 16)                     # no index.json
    with pytest.raises(DataError, match="not in"):
        ShardSource(f"shards:{shards}/shard-000099.tar", 16)
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a keel shards index"):
        read_index(tmp_path)
    with pytest.raises(DataError, match="divisible"):
        ShardSource(f"shards:{shards}", 16).plan(0, 0, batch_size=9, world=2)


def test_stream_decodes_the_stored_images_with_their_labels_and_sizes(shards):
    src = ShardSource(f"shards:{shards}", img_size=16, shuffle_buffer=4)
    raw = next(src.raw_batches(0, 0, 8))
    batch = next(src.stream(0, 0, 8, seed=0, rank=0, world=1, device=torch.device("cpu"), num_workers=0))
    assert batch["global_size"] == 8 and batch["images"].dtype == torch.uint8
    meta = [json.loads(m["json"]) for _, m in raw]
    assert batch["labels"].tolist() == [int(m["path"].startswith("c1")) for m in meta]
    for k, (key, members) in enumerate(raw):
        want = decode_whole(str(key), 18, members["jpg"])      # train_side(16) = 18
        h, w = batch["sizes"][k].tolist()
        assert (h, w) == tuple(want.shape[-2:])
        assert torch.equal(batch["images"][k, :, :h, :w], want)
        assert (batch["images"][k, :, h:, :] == 0).all() and (batch["images"][k, :, :, w:] == 0).all()
    # two workers decode the same batches as the main process
    two = next(src.stream(0, 0, 8, seed=0, rank=0, world=1, device=torch.device("cpu"), num_workers=2))
    assert torch.equal(two["images"], batch["images"]) and torch.equal(two["sizes"], batch["sizes"])


def test_on_device_decoding_equals_the_worker_path(shards):
    src = ShardSource(f"shards:{shards}", img_size=16)
    raw = next(src.raw_batches(0, 0, 8))
    from keel.data.folders import collate_skip
    dec = _Decoder(18, 16)
    by_device = dec.on_device(raw, torch.device("cpu"))      # the CUDA path (nvJPEG), run on the CPU
    assert dec.fallbacks == 0                                 # one batched call, no per-file retry
    by_workers = collate_skip([dec[r] for r in raw])
    assert torch.equal(by_device["images"], by_workers["images"])
    assert torch.equal(by_device["sizes"], by_workers["sizes"])


def _tar_with_a_bad_sample(root):
    good = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(good, "JPEG")
    good = good.getvalue()
    bad = good[: good.find(b"\xff\xda") + 30]                   # cut inside the scan: no end marker
    root.mkdir()
    with tarfile.open(root / "shard-000000.tar", "w") as tf:
        for key, data in [(0, good), (1, bad), (2, good), (3, good)]:
            for ext, payload in [("jpg", data), ("cls", b"1")]:
                info = tarfile.TarInfo(f"{key:09d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    index = {"format": "keel-shards", "version": 1, "count": 4, "classes": ["a", "b"], "text": False,
             "max_side": 256, "quality": 90, "per_shard": 4, "dropped": 0,
             "shards": [{"name": "shard-000000.tar", "count": 4, "bytes": 0, "first": 0}]}
    (root / "index.json").write_text(json.dumps(index))


def test_a_bad_sample_is_skipped_counted_and_its_batch_refilled(tmp_path):
    _tar_with_a_bad_sample(tmp_path / "bad")
    src = ShardSource(f"shards:{tmp_path / 'bad'}", img_size=16, shuffle_buffer=1)
    skipped = {}
    batch = next(src.stream(0, 0, 4, 0, 0, 1, torch.device("cpu"), 0, skipped=skipped))
    assert len(batch["images"]) == 4 and batch["labels"].tolist() == [1, 1, 1, 1]
    assert list(skipped) == [1] and "end-of-image" in skipped[1]
    assert src.name_of(1) == "shard-000000.tar/000000001"


def test_on_device_decoding_falls_back_per_file_for_a_bad_one(tmp_path):
    _tar_with_a_bad_sample(tmp_path / "bad")
    src = ShardSource(f"shards:{tmp_path / 'bad'}", img_size=16, shuffle_buffer=1)
    dec = _Decoder(18, 16)
    batch = dec.on_device(next(src.raw_batches(0, 0, 4)), torch.device("cpu"))
    assert dec.fallbacks == 1 and batch["skipped"].tolist() == [1] and len(batch["images"]) == 3
