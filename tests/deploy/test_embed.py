"""keel embed: embeddings equal the eager backbone's on the evaluation view, a killed run resumed
equals an unbroken one, shards are read in order (checked against webdataset's reader), bad
files are listed, and two processes under torchrun write what one process writes.

The 2-process check runs this file as a script in two worker processes with torchrun's
environment (``launch_workers`` in tests/conftest.py)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from keel import hub
from keel.data.decode import _pil_to_tensor, _resize_center_crop, load_image
from keel.data.errors import DataError
from keel.deploy import embed as E
from keel.evaluate.frozen import make_eval_transform

SPEC, SIZE = "random:resnet10_cifar", 32


def make_folder(root: Path) -> Path:
    """7 photos (JPEG and PNG, in a sub-folder too, of several sizes and shapes) and 2 bad files. All
    under 4x the side, where the folder reader decodes as evaluation does (bigger JPEGs: see below)."""
    import skimage.data as d
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry"]):
        a = getattr(d, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a
        im = Image.fromarray(a)
        short = 60 + 20 * (i % 3)
        im = im.resize((im.width * short // min(im.size), im.height * short // min(im.size)))
        where = root / "sub" if i % 2 else root
        im.save(where / f"{name}.{'png' if i % 3 == 2 else 'jpg'}", **({} if i % 3 == 2 else {"quality": 85}))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "sub" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("photos") / "photos")


def load_all(out: Path) -> tuple[np.ndarray, list[list[str]], dict]:
    index = json.loads((out / "index.json").read_text())
    feats = [np.load(out / c["embeddings"]) for c in index["chunks"]]
    rows = []
    for c in index["chunks"]:
        with open(out / c["paths"], newline="") as fh:
            rows += list(csv.reader(fh))[1:]
    return np.concatenate(feats), rows, index


def eager(images: torch.Tensor, normalize: bool = True) -> np.ndarray:
    model, size = hub.resolve_backbone(SPEC, SIZE)
    with torch.no_grad():
        z = model.eval().embed(make_eval_transform(size)(images))
    return (F.normalize(z, dim=1) if normalize else z).numpy()


def eval_view(path: str) -> torch.Tensor:
    return _pil_to_tensor(_resize_center_crop(load_image(path), SIZE))


def test_folder_embeddings_equal_the_eager_backbone_and_bad_files_are_listed(folder, tmp_path):
    out = tmp_path / "emb"
    res = E.embed(SPEC, str(folder), out, img_size=SIZE, batch_size=2, chunk_size=3, num_workers=0, progress=False)
    feats, rows, index = load_all(out)
    paths = [r[0] for r in rows]
    good = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.name not in ("broken.jpg", "empty.png"))
    assert paths == good                                   # every decodable image, in sorted path order
    assert feats.dtype == np.float32 and feats.shape == (7, 256)
    np.testing.assert_allclose(feats, eager(torch.stack([eval_view(p) for p in paths])), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    # 9 files in chunks of 3: the bad ones leave their chunks short
    assert [c["count"] for c in index["chunks"]] == [2, 3, 2] and [c["first"] for c in index["chunks"]] == [0, 2, 5]
    assert index["count"] == res["count"] == 7 and index["dim"] == 256 and index["skipped"] == 2
    assert index["model"] == "resnet10_cifar" and index["normalized"] is True and index["img_size"] == SIZE
    skipped = dict(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    assert set(skipped) == {str(folder / "broken.jpg"), str(folder / "sub" / "empty.png")}
    assert all(reason.strip() for reason in skipped.values())
    # the same command again finds nothing to do; other settings are refused
    again = E.embed(SPEC, str(folder), out, img_size=SIZE, batch_size=2, chunk_size=3, num_workers=0, progress=False)
    assert again["run"]["up_to_date"] and again["run"]["embedded"] == 0
    with pytest.raises(DataError, match="chunk_size"):
        E.embed(SPEC, str(folder), out, img_size=SIZE, chunk_size=4, num_workers=0, progress=False)


def test_big_jpegs_are_decoded_at_a_reduced_scale_close_to_the_full_decode(tmp_path):
    import skimage.data as d
    Image.fromarray(d.astronaut()).save(tmp_path / "big.jpg", quality=95)      # 512 px: 16x the side
    ds = E._EvalFolder(str(tmp_path), SIZE, paths=[str(tmp_path / "big.jpg")])
    drafted, full = ds[0][0], eval_view(str(tmp_path / "big.jpg"))
    assert drafted.shape == full.shape == (3, SIZE, SIZE)
    assert (drafted.float() - full.float()).abs().mean() < 2.0     # grey levels out of 255
    a, b = eager(torch.stack([drafted, full]))
    assert float(a @ b) > 0.999


def test_builtin_raw_float16(tmp_path):
    from keel.data.sources import build_dataset
    E.embed(SPEC, "digits", tmp_path, img_size=SIZE, split="test", batch_size=50, chunk_size=100, dtype="float16",
            normalize=False, num_workers=0, progress=False)
    feats, rows, index = load_all(tmp_path)
    images = build_dataset("digits", "test", SIZE).images
    assert feats.dtype == np.float16 and len(feats) == len(images) == index["count"] and index["normalized"] is False
    assert rows[0] == ["digits:test:0"] and rows[-1] == [f"digits:test:{len(images) - 1}"]
    np.testing.assert_allclose(feats.astype(np.float32), eager(images, normalize=False), rtol=2e-3, atol=2e-3)
    assert E.open_image(E.read_index(tmp_path), rows[5][0], SIZE).equal(images[5])


def test_a_killed_run_resumed_equals_an_unbroken_one(folder, tmp_path, monkeypatch):
    kw = dict(img_size=SIZE, batch_size=2, chunk_size=2, num_workers=0, progress=False)
    whole = E.embed(SPEC, str(folder), tmp_path / "whole", **kw)
    write = E._write_chunk
    calls = []

    def dies_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(args[1])
        write(*args, **kwargs)
    monkeypatch.setattr(E, "_write_chunk", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        E.embed(SPEC, str(folder), tmp_path / "broken", **kw)
    monkeypatch.setattr(E, "_write_chunk", write)
    assert not (tmp_path / "broken" / "index.json").exists()
    assert sorted(p.name for p in (tmp_path / "broken").glob("*-0*")) == ["embeddings-00000.npy", "paths-00000.csv"]
    resumed = E.embed(SPEC, str(folder), tmp_path / "broken", **kw)
    assert resumed["run"]["embedded"] == 9 - 2              # only the chunks without a record
    names = sorted(p.name for p in (tmp_path / "whole").glob("*-0*"))
    assert names == sorted(p.name for p in (tmp_path / "broken").glob("*-0*")) and len(names) == 2 * 5
    for name in names + ["skipped.txt"]:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "broken" / name).read_bytes(), name
    drop = {"created", "seconds", "run"}
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}


def test_shards_are_read_in_order_with_their_source_paths(folder, tmp_path):
    import webdataset as wds

    from keel.data.shards_write import write_shards
    write_shards(folder, tmp_path / "shards", per_shard=3, workers=1, progress=False)
    E.embed(SPEC, f"shards:{tmp_path / 'shards'}", tmp_path / "emb", img_size=SIZE, batch_size=2, chunk_size=4,
            num_workers=1, progress=False)
    feats, rows, index = load_all(tmp_path / "emb")
    # a second reader: webdataset over the tar files, in index order
    names = [s["name"] for s in json.loads((tmp_path / "shards" / "index.json").read_text())["shards"]]
    samples = list(wds.WebDataset([str(tmp_path / "shards" / n) for n in names], shardshuffle=False))
    assert [r[0].split("/")[1] for r in rows] == [s["__key__"] for s in samples]
    assert [r[1] for r in rows] == [json.loads(s["json"])["path"] for s in samples]
    assert sorted(r[1] for r in rows) == sorted(str(p.relative_to(folder)) for p in folder.rglob("*.*")
                                                if p.name not in ("broken.jpg", "empty.png"))
    images = torch.stack([_pil_to_tensor(_resize_center_crop(load_image("x", s["jpg"]), SIZE)) for s in samples])
    np.testing.assert_allclose(feats, eager(images), atol=1e-5)
    assert index["kind"] == "shards" and index["columns"] == ["path", "source"] and index["count"] == 7
    assert E.open_image(E.read_index(tmp_path / "emb"), rows[4][0], SIZE).equal(images[4])


def test_bad_arguments_are_one_line_errors(folder, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        E.embed(SPEC, str(tmp_path / "nowhere"), tmp_path / "o", img_size=SIZE, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        E.embed(SPEC, str(folder), tmp_path / "o", dtype="int8", progress=False)
    with pytest.raises(DataError, match="not a finished keel embed folder"):
        E.read_index(tmp_path / "o")


def _worker(task: Path) -> None:
    import os
    res = E.embed(SPEC, str(task / "photos"), task / "emb", img_size=SIZE, batch_size=2, chunk_size=2,
                  num_workers=0, device="cpu", progress=False)
    torch.save({"embedded": res["run"]["embedded"], "count": res["count"]}, task / f"rank{os.environ['RANK']}.pt")


def test_two_processes_write_what_one_process_writes(folder, tmp_path, launch_workers):
    import shutil
    shutil.copytree(folder, tmp_path / "photos")
    results = launch_workers(__file__, tmp_path, 2, timeout=120)
    # 5 chunks: rank 0 embeds chunks 0, 2, 4 (2 + 2 + 1 files), rank 1 chunks 1, 3
    assert [r["embedded"] for r in results] == [5, 4] and all(r["count"] == 7 for r in results)
    one = E.embed(SPEC, str(tmp_path / "photos"), tmp_path / "one", img_size=SIZE, batch_size=2, chunk_size=2,
                  num_workers=0, progress=False)
    names = sorted(p.name for p in (tmp_path / "one").glob("*-0*")) + ["skipped.txt"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "emb" / name).read_bytes(), name
    assert json.loads((tmp_path / "emb" / "index.json").read_text())["chunks"] == one["chunks"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
