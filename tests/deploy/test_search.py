"""keel search: the chunked exact top-k equals a brute-force sort over the whole matrix, paths come
back for the right rows, and the command embeds its queries with the index's model and draws them."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keel.data.errors import DataError
from keel.deploy import embed as E
from keel.deploy import search as S


def write_index(out: Path, chunks: list[np.ndarray], normalized: bool = True, dtype: str = "float32",
                kind: str = "folder") -> dict:
    """An embeddings folder from arrays, one per chunk, through keel embed's own writer; row i's
    path is 'img-i.jpg'."""
    first = 0
    for c, arr in enumerate(chunks):
        rows = [[f"img-{first + i}.jpg"] for i in range(len(arr))]
        E._write_chunk(out, c, arr.astype(dtype), ("path",), rows, [], 0.0)
        first += len(arr)
    settings = {"model": "test", "checkpoint": None, "model_sha256": "", "img_size": 32, "data": str(out),
                "kind": kind, "split": None, "source_count": first, "chunk_size": max(map(len, chunks)),
                "dtype": dtype, "normalized": normalized, "columns": ["path"]}
    E._finish(out, settings, len(chunks), chunks[0].shape[1], time.time())
    return E.read_index(out)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ x.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def assert_same_topk(got_s, got_r, want_s, want_r, x, q):
    """The same rows in the same order, except where two rows' similarities tie (within float32's
    rounding of the products): those may come in either order."""
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    sims = brute_force(x, q, len(x))[0]
    true = np.take_along_axis(np.argsort(np.argsort(-sims, axis=1, kind="stable"), axis=1), got_r, 1)
    for i, j in zip(*np.nonzero(got_r != want_r)):
        assert abs(sims[i, true[i, j]] - want_s[i, j]) < 1e-5, (i, j)


@pytest.mark.parametrize("dtype,normalized", [("float32", False), ("float16", True)])
def test_chunked_topk_equals_brute_force(tmp_path, dtype, normalized):
    rng = np.random.default_rng(0)
    sizes = [300, 1, 0, 451, 248]                     # uneven chunks, one empty
    x = rng.normal(size=(sum(sizes), 24)).astype(np.float32)
    if normalized:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    stored = x.astype(dtype).astype(np.float32)       # what the index holds
    parts = np.split(x, np.cumsum(sizes)[:-1])
    index = write_index(tmp_path, parts, normalized=normalized, dtype=dtype)
    q = rng.normal(size=(37, 24)).astype(np.float32)
    want_s, want_r = brute_force(stored, q, 10)
    for block in (7, 64, 5000):                       # blocks inside chunks, and whole chunks
        got_s, got_r = S.search(index, q, 10, block_rows=block)
        assert_same_topk(got_s, got_r, want_s, want_r, stored, q)
        assert (got_r == want_r).mean() > 0.99
    # k beyond the count: every row, ranked
    small = write_index(tmp_path / "small", [x[:5]], normalized=normalized, dtype=dtype)
    got_s, got_r = S.search(small, q[:3], 50)
    np.testing.assert_array_equal(got_r, brute_force(stored[:5], q[:3], 5)[1])


def test_paths_of_reads_the_rows_asked(tmp_path):
    rng = np.random.default_rng(1)
    index = write_index(tmp_path, [rng.normal(size=(n, 4)) for n in (3, 5, 2)])
    names = S.paths_of(index, np.array([[9, 0], [3, 7]]))
    assert names == {9: ["img-9.jpg"], 0: ["img-0.jpg"], 3: ["img-3.jpg"], 7: ["img-7.jpg"]}


def test_faiss_option_finds_the_exact_neighbours_on_a_small_index(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 16)).astype(np.float32)
    index = write_index(tmp_path, [x[:200], x[200:]], normalized=False)
    q = rng.normal(size=(20, 16)).astype(np.float32)
    exact = S.search(index, q, 5)[1]
    approx_s, approx = S.faiss_search(index, q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approx, exact)])
    assert recall >= 0.95
    assert (tmp_path / S.FAISS_FILE).is_file()
    np.testing.assert_array_equal(S.faiss_search(index, q, 5)[1], approx)     # read back, same graph


def photo_folder(root: Path) -> Path:
    """5 small photos, 3 of them in sub/, and an empty file there."""
    import skimage.data as d
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "camera"]):
        a = getattr(d, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a
        Image.fromarray(a).resize((96, 80)).save(root / ("sub" if i % 2 == 0 else "") / f"{name}.jpg")
    (root / "sub" / "empty.png").write_bytes(b"")
    return root


def test_search_command_writes_csv_and_grid(tmp_path):
    SPEC, SIZE = "random:resnet10_cifar", 32
    folder = photo_folder(tmp_path / "photos")
    E.embed(SPEC, str(folder), tmp_path / "emb", img_size=SIZE, chunk_size=3, num_workers=0, progress=False)
    res = S.run_search(tmp_path / "emb", str(folder / "sub"), k=4, out=tmp_path / "res", show=2)
    with open(tmp_path / "res" / "search.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    queries = sorted({r["query"] for r in rows})
    assert queries == sorted(str(p) for p in (folder / "sub").iterdir() if p.name != "empty.png")
    assert [p for p, _ in res["skipped"]] == [str(folder / "sub" / "empty.png")]
    for qpath in queries:          # every query is in the index: it finds itself first
        mine = [r for r in rows if r["query"] == qpath]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3, 4]
        assert mine[0]["path"] == qpath and float(mine[0]["similarity"]) > 0.9999
        sims = [float(r["similarity"]) for r in mine]
        assert sims == sorted(sims, reverse=True)
    from keel.viz.pictures import CELL, DPI, TITLE_BAND
    with Image.open(tmp_path / "res" / "search.png") as im:      # 2 queries shown, each with 4 hits
        assert im.size == (round(5 * CELL * DPI), round((2 * CELL + TITLE_BAND) * DPI))
    # another model's weights: refused, not silently compared
    index = json.loads((tmp_path / "emb" / "index.json").read_text())
    index["model_sha256"] = "0" * 64
    (tmp_path / "emb" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="no longer the one"):
        S.run_search(tmp_path / "emb", str(folder / "coffee.jpg"))


def test_damaged_or_missing_index(tmp_path):
    index = write_index(tmp_path, [np.ones((4, 3), np.float32)])
    np.save(tmp_path / "embeddings-00000.npy", np.ones((3, 3), np.float32))
    with pytest.raises(DataError, match="damaged"):
        S.search(index, np.ones((1, 3), np.float32), 2)
    with pytest.raises(DataError, match="no index.json"):
        E.read_index(tmp_path / "nothing")


def test_the_three_commands_from_the_command_line(tmp_path, capsys):
    import argparse

    from keel import cli_deploy
    parser = argparse.ArgumentParser(prog="keel")
    cli_deploy.add_parsers(parser.add_subparsers(dest="command"))
    run = {"embed": cli_deploy.cmd_embed, "search": cli_deploy.cmd_search, "dedup": cli_deploy.cmd_dedup}

    def keel(*argv: str) -> str:
        args = parser.parse_args([str(a) for a in argv])
        assert run[args.command](args) == 0
        return capsys.readouterr().out

    folder = photo_folder(tmp_path / "photos")
    emb = tmp_path / "emb"
    printed = keel("embed", "--checkpoint", "random:resnet10_cifar", "--data", folder, "--out", emb, "--img-size", 32,
                   "--chunk-size", 2, "--workers", 0, "--device", "cpu")
    assert printed.startswith(f"embedded 5 images into 3 chunks of 256-dim float32 in {emb}; 1 skipped")
    assert "is up to date: 5 images" in keel("embed", "--checkpoint", "random:resnet10_cifar", "--data", folder,
                                             "--out", emb, "--img-size", 32, "--chunk-size", 2, "--workers", 0)
    printed = keel("search", "--index", emb, "--query", folder / "coffee.jpg", "-k", 3, "--device", "cpu")
    assert printed.strip() == f"top 3 of 1 queries: {emb / 'search.csv'}, {emb / 'search.png'}"
    printed = keel("dedup", "--index", emb, "--threshold", -1, "--out", tmp_path / "d")
    assert printed.startswith("1 group of near-duplicates (5 of 5 images, the largest 5) at cosine >= -1.0; "
                              f"4 files to drop in {tmp_path / 'd' / 'drop.txt'}")
