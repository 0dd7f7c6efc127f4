"""keel shards: sources -> WebDataset tar shards, read back with the webdataset library itself."""
from __future__ import annotations

import argparse
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from keel.cli_shards import add_parser, cmd_shards
from keel.data import shards_write
from keel.data.errors import DataError
from keel.data.shards_write import read_index, write_shards


def _save(path: Path, h: int, w: int, color: tuple[int, int, int], fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), color).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _read(out: Path) -> list[dict]:
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    for s in samples:
        s["meta"] = json.loads(s["json"])
        s["image"] = Image.open(io.BytesIO(s["jpg"]))
        s["image"].load()
    return samples


def _run(src, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return write_shards(src, out, **kw)


# sizes (h, w) around max_side=32: both sides larger, one side smaller (kept), odd aspect ratios
SIZES = [(40, 70), (64, 33), (20, 50), (100, 45), (32, 32), (47, 200)]


@pytest.fixture
def labeled(tmp_path: Path) -> tuple[Path, dict[str, tuple]]:
    """Three class folders; each image a distinct flat colour so it can be recognised after JPEG."""
    src, truth = tmp_path / "src", {}
    for k, (h, w) in enumerate(SIZES * 2):
        cls = ["ant", "bee", "cow"][k % 3]
        color = (40 * (k % 6), 255 - 20 * k, 30 + 15 * k)
        rel = f"{cls}/img{k:02d}.{'png' if k % 4 == 0 else 'jpg'}"
        _save(src / rel, h, w, color, "PNG" if k % 4 == 0 else "JPEG")
        truth[rel] = (cls, h, w, color)
    return src, truth


def test_labeled_folder_read_back_with_webdataset(labeled, tmp_path):
    src, truth = labeled
    out = tmp_path / "out"
    index = _run(src, out, max_side=32, per_shard=5)
    samples = _read(out)
    assert sorted(s["meta"]["path"] for s in samples) == sorted(truth)           # every image exactly once
    assert index["classes"] == ["ant", "bee", "cow"] and index["text"] is False
    for s in samples:
        cls, h, w, color = truth[s["meta"]["path"]]
        assert int(s["cls"]) == index["classes"].index(cls)
        img = s["image"]
        assert img.format == "JPEG" and img.mode == "RGB"
        assert s["meta"]["size"] == [img.height, img.width]
        short, long_ = min(h, w), max(h, w)
        new_short = min(short, 32)
        assert min(img.size) == new_short
        assert abs(max(img.size) - long_ * new_short / short) <= 1                # aspect ratio kept
        assert (img.width >= img.height) == (w >= h)
        assert np.abs(np.asarray(img, dtype=float).mean((0, 1)) - color).max() < 4  # the right picture
        assert "txt" not in s
    # keys are the item indices over the sorted file list in a fixed random order (seed 0), so no
    # shard holds one class; shard k holds items [5k, 5k+5)
    order = sorted(truth)
    random.Random(0).shuffle(order)
    assert [s["__key__"] for s in samples] == [f"{order.index(s['meta']['path']):09d}" for s in samples]
    assert [s["__key__"] for s in samples] == sorted(s["__key__"] for s in samples)
    assert len({int(s["cls"]) for s in samples[:5]}) > 1                          # classes mixed
    plain = _run(src, tmp_path / "plain", max_side=32, per_shard=5, shuffle=False)
    assert [s["meta"]["path"] for s in _read(tmp_path / "plain")] == sorted(truth) and plain["count"] == 12
    assert [s["count"] for s in index["shards"]] == [5, 5, 2]
    assert [s["first"] for s in index["shards"]] == [0, 5, 10]
    on_disk = read_index(out)
    assert on_disk == {k: v for k, v in index.items() if k != "run"}
    assert [os.path.getsize(out / s["name"]) for s in on_disk["shards"]] == [s["bytes"] for s in on_disk["shards"]]
    assert (out / "dropped.txt").read_text() == "" and on_disk["dropped"] == 0
    assert sorted(os.listdir(out)) == ["dropped.txt", "index.json", "shard-000000.tar", "shard-000001.tar",
                                       "shard-000002.tar"]


def test_unlabeled_folders(tmp_path):
    flat = tmp_path / "flat"
    for k in range(3):
        _save(flat / f"{k}.jpg", 40, 40, (k * 50, 0, 0))
    one_class = tmp_path / "one"
    for k in range(2):
        _save(one_class / "only" / f"{k}.jpg", 40, 40, (0, 0, 0))
    for src in (flat, one_class):      # images loose in the root, or a single sub-folder: no labels
        index = _run(src, tmp_path / f"out-{src.name}", max_side=16)
        assert index["classes"] is None and index["count"] == len(_read(tmp_path / f"out-{src.name}"))
        assert all("cls" not in s for s in _read(tmp_path / f"out-{src.name}"))
    with pytest.raises(DataError, match="directly in it"):
        _run(flat, tmp_path / "x", labeled=True)


def test_unlabeled_flag_on_class_folders(labeled, tmp_path):
    src, truth = labeled
    index = _run(src, tmp_path / "out", labeled=False, max_side=32)
    assert index["classes"] is None and index["count"] == len(truth)
    assert all("cls" not in s for s in _read(tmp_path / "out"))


def test_image_text_folder(tmp_path):
    src = tmp_path / "pairs"
    captions = {"cats/a": "a cat on a mat", "cats/b": "  ünïcode caption\n", "dogs/c": "a dog",
                "dogs/d": None, "dogs/e": "   \n"}
    for k, (stem, text) in enumerate(captions.items()):
        _save(src / f"{stem}.jpg", 30, 50, (k * 40, 0, 0))
        if text is not None:
            (src / f"{stem}.txt").write_text(text, encoding="utf-8")
    index = _run(src, tmp_path / "out", max_side=16)
    samples = _read(tmp_path / "out")
    assert index["text"] is True and index["classes"] == ["cats", "dogs"]
    got = {s["meta"]["path"]: (s["txt"].decode("utf-8"), int(s["cls"])) for s in samples}
    assert got == {"cats/a.jpg": ("a cat on a mat", 0), "cats/b.jpg": ("ünïcode caption", 0),
                   "dogs/c.jpg": ("a dog", 1)}
    assert (tmp_path / "out" / "dropped.txt").read_text().splitlines() == ["dogs/d.jpg\tno caption",
                                                                          "dogs/e.jpg\tno caption"]
    assert index["dropped"] == 2 and index["count"] == 3
    # members of a sample in the documented order
    import tarfile
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:4] == ["000000000.jpg", "000000000.cls", "000000000.txt", "000000000.json"]


def test_csv_with_label_and_text(tmp_path):
    root = tmp_path / "data"
    for k in range(4):
        _save(root / "imgs" / f"{k}.png", 20 + k, 30, (k * 60, 10, 10), "PNG")
    rows = ["Path,label,caption,extra",
            "imgs/3.png,zebra,third,x",         # CSV order is kept (--no-shuffle), classes are sorted
            "imgs/0.png,ant,zeroth,x",
            "imgs/missing.png,ant,gone,x",      # line 4
            "imgs/1.png,,no label,x",           # line 5
            "",
            f"{root / 'imgs' / '2.png'},ant,\"absolute, with comma\",x"]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    index = _run(root / "list.csv", tmp_path / "out", max_side=64, shuffle=False)
    samples = _read(tmp_path / "out")
    assert index["classes"] == ["ant", "zebra"] and index["text"] is True
    got = [(s["__key__"], s["meta"]["path"], int(s["cls"]), s["txt"].decode()) for s in samples]
    assert got == [("000000000", "imgs/3.png", 1, "third"), ("000000001", "imgs/0.png", 0, "zeroth"),
                   ("000000002", str(root / "imgs" / "2.png"), 0, "absolute, with comma")]
    assert samples[0]["meta"]["size"] == [23, 30]                                # smaller than max_side: kept
    assert (tmp_path / "out" / "dropped.txt").read_text().splitlines() == [
        "imgs/1.png\tline 5: empty label", "imgs/missing.png\tline 4: file not found"]
    assert index["dropped"] == 2

    (root / "nolabel.csv").write_text("image\nimgs/0.png\nimgs/1.png\n")     # no label, no text: fine
    plain = _run(root / "nolabel.csv", tmp_path / "out2")
    assert plain["classes"] is None and plain["text"] is False and plain["count"] == 2
    # the columns keel clip train finds are the ones keel shards finds: one CSV serves both
    (root / "captions.csv").write_text("FilePath,Title,Category\nimgs/0.png,a red thing,x\nimgs/3.png,a blue one,y\n")
    pairs = _run(root / "captions.csv", tmp_path / "out4", shuffle=False)
    assert pairs["text"] is True and pairs["classes"] == ["x", "y"] and pairs["count"] == 2
    from keel.data.pairs import read_pairs
    rec = read_pairs(str(root / "captions.csv"))
    assert [s["txt"].decode() for s in _read(tmp_path / "out4")] == rec.texts == ["a red thing", "a blue one"]
    (root / "bad.csv").write_text("name,label\nimgs/0.png,a\n")
    with pytest.raises(DataError, match="no image column"):
        _run(root / "bad.csv", tmp_path / "out3")


def test_bad_files_dropped_and_listed(tmp_path):
    src = tmp_path / "src"
    for k in range(4):
        _save(src / f"good{k}.jpg", 30, 30, (0, 0, 0))
    good = (src / "good0.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "empty.png").write_bytes(b"")
    (src / "notes.jpg").write_text("this is not an image\n")
    index = _run(src, tmp_path / "out", per_shard=3, shuffle=False)   # bad files at known places
    lines = (tmp_path / "out" / "dropped.txt").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["empty.png", "notes.jpg", "truncated.jpg"]
    assert all(ln.split("\t")[1] for ln in lines)
    assert index["count"] == 4 and index["dropped"] == 3
    assert sum(s["count"] for s in index["shards"]) == 4 == len(_read(tmp_path / "out"))
    # sorted items: empty.png good0-3 notes truncated -> shards [empty g0 g1] [g2 g3 notes] [truncated]
    assert [(s["count"], s["first"]) for s in index["shards"]] == [(2, 1), (2, 3), (0, 6)]


def _many(tmp_path: Path, n: int = 9) -> Path:
    src = tmp_path / "many"
    for k in range(n):
        _save(src / ("a" if k % 2 else "b") / f"{k}.jpg", 40 + k, 36, (k * 25, 100, 0))
    return src


def test_resume_after_kill_redoes_only_missing_shards(tmp_path, monkeypatch):
    src = _many(tmp_path)
    whole = tmp_path / "whole"
    _run(src, whole, per_shard=2, max_side=24)

    real = shards_write._write_shard
    calls: list[int] = []

    def dies_after_first(out, shard, *args):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(shard)
        return real(out, shard, *args)

    out = tmp_path / "out"
    monkeypatch.setattr(shards_write, "_write_shard", dies_after_first)
    with pytest.raises(KeyboardInterrupt):
        _run(src, out, per_shard=2, max_side=24)
    assert not (out / "index.json").exists()
    assert len((out / ".progress.jsonl").read_text().splitlines()) == 1
    (out / "shard-000003.tar.tmp").write_bytes(b"half a shard")                 # killed mid-write
    with pytest.raises(DataError, match="other settings"):                       # a different run is refused
        _run(src, out, per_shard=2, max_side=20)

    redone: list[int] = []

    def counting(out, shard, *args):
        redone.append(shard)
        return real(out, shard, *args)

    monkeypatch.setattr(shards_write, "_write_shard", counting)
    index = _run(src, out, per_shard=2, max_side=24)
    assert sorted(redone) == [1, 2, 3, 4]
    assert index["run"]["converted"] == 7 and index["count"] == 9
    assert sorted(os.listdir(out)) == sorted(os.listdir(whole))                 # .tmp, .progress, .settings gone
    for name in (s["name"] for s in index["shards"]):
        assert (out / name).read_bytes() == (whole / name).read_bytes()

    redone.clear()                                                               # finished: nothing to do
    again = _run(src, out, per_shard=2, max_side=24)
    assert redone == [] and again["run"]["up_to_date"] and again["count"] == 9
    with pytest.raises(DataError, match="other settings"):
        _run(src, out, per_shard=3, max_side=24)


def test_resume_redoes_a_shard_without_a_record(tmp_path, monkeypatch):
    """A shard renamed into place whose progress line never made it to disk is done again."""
    src = _many(tmp_path, 6)
    real = shards_write._write_shard
    done: list[int] = []

    def dies_at_third(out, shard, *args):
        if len(done) == 2:
            raise RuntimeError("killed")
        done.append(shard)
        return real(out, shard, *args)

    out = tmp_path / "out"
    monkeypatch.setattr(shards_write, "_write_shard", dies_at_third)
    with pytest.raises(RuntimeError):
        _run(src, out, per_shard=2)
    lines = (out / ".progress.jsonl").read_text().splitlines()
    (out / ".progress.jsonl").write_text(lines[0] + "\n" + lines[1][:10])       # second record cut short
    redone: list[int] = []
    monkeypatch.setattr(shards_write, "_write_shard",
                        lambda out, shard, *a: redone.append(shard) or real(out, shard, *a))
    index = _run(src, out, per_shard=2)
    assert redone == [1, 2] and index["count"] == 6


def test_worker_count_does_not_change_the_shards(tmp_path):
    src = _many(tmp_path, 7)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(src, one, per_shard=2, max_side=24, workers=1)
    _run(src, two, per_shard=2, max_side=24, workers=2)
    names = sorted(p.name for p in one.glob("shard-*.tar"))
    assert len(names) == 4 and names == sorted(p.name for p in two.glob("shard-*.tar"))
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_exclude_list(labeled, tmp_path):
    src, truth = labeled
    rels = sorted(truth)
    listing = tmp_path / "leave-out.txt"
    listing.write_text(f"# near-duplicates\n{rels[0]}\n\n{src / rels[3]}\n")
    index = _run(src, tmp_path / "out", exclude=listing, max_side=32)
    kept = sorted(s["meta"]["path"] for s in _read(tmp_path / "out"))
    assert kept == [r for k, r in enumerate(rels) if k not in (0, 3)]
    assert index["run"]["excluded"] == 2 and index["dropped"] == 0
    with pytest.raises(DataError, match="exclude list"):
        _run(src, tmp_path / "out2", exclude=tmp_path / "nope.txt")


def test_read_index_rejects_other_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something", "count": 3}))
    with pytest.raises(DataError, match="not a keel shards index"):
        read_index(tmp_path / "index.json")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="keel")
    add_parser(parser.add_subparsers(dest="command"))
    return cmd_shards(parser.parse_args(["shards", *argv]))


def test_cli(labeled, tmp_path, capsys):
    src, truth = labeled
    out = tmp_path / "out"
    assert _cli([str(src), str(out), "--max-side", "24", "--per-shard", "7", "--quality", "80", "--workers", "1"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {len(truth)} labeled images of 3 classes in 2 shards" in said and "images/s" in said
    index = read_index(out)
    assert (index["max_side"], index["per_shard"], index["quality"]) == (24, 7, 80)
    assert all(min(s["image"].size) <= 24 for s in _read(out))
    assert _cli([str(src), str(out), "--max-side", "24", "--per-shard", "7", "--quality", "80"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert _cli([str(src), str(tmp_path / "u"), "--unlabeled", "--workers", "1"]) == 0
    assert read_index(tmp_path / "u")["classes"] is None
    with pytest.raises(DataError, match="neither a folder nor a .csv"):
        _cli([str(tmp_path / "nothing"), str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        _cli([str(src), str(out), "--labeled", "--unlabeled"])
