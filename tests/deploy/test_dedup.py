"""keel dedup: the pairs equal a brute-force scan, the groups equal scipy's connected components,
a hand-built case groups through a chain, and planted near-duplicates of real photos (resized,
re-encoded, cropped copies) come out as exactly the planted groups, with a drop list that keel
shards' --exclude reads."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from keel.deploy import dedup as D
from keel.deploy import embed as E


def write_index(out: Path, x: np.ndarray, chunk: int, names: list[str] | None = None) -> dict:
    """An embeddings folder holding the rows of x in chunks, through keel embed's own writer."""
    names = names or [f"img-{i:03d}.jpg" for i in range(len(x))]
    for c, a in enumerate(range(0, len(x), chunk)):
        E._write_chunk(out, c, x[a:a + chunk].astype(np.float32), ("path",), [[n] for n in names[a:a + chunk]], [], 0.0)
    settings = {"model": "test", "checkpoint": None, "model_sha256": "", "img_size": 32, "data": str(out),
                "kind": "folder", "split": None, "source_count": len(x), "chunk_size": chunk, "dtype": "float32",
                "normalized": False, "columns": ["path"]}
    E._finish(out, settings, -(-len(x) // chunk), x.shape[1], time.time())
    return E.read_index(out)


def test_components_equal_scipy_on_random_graphs():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    rng = np.random.default_rng(0)
    for n, m in [(1, 0), (10, 4), (200, 150), (1000, 900), (500, 2000)]:
        u, v = rng.integers(0, n, m), rng.integers(0, n, m)
        cut = np.sort(rng.integers(0, m + 1, 2))          # the edges in three batches, as a scan gives them
        labels = D.components(n, [(u[:cut[0]], v[:cut[0]]), (u[cut[0]:cut[1]], v[cut[0]:cut[1]]),
                                  (u[cut[1]:], v[cut[1]:])])
        _, ref = connected_components(coo_matrix((np.ones(m), (u, v)), shape=(n, n)), directed=False)
        # the same partition: a bijection between label sets
        pairs = set(zip(labels.tolist(), ref.tolist()))
        assert len(pairs) == len(set(labels.tolist())) == len(set(ref.tolist()))
        assert all(labels[i] <= i for i in range(n))          # labelled by the smallest member


def test_pairs_equal_a_brute_force_scan():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(103, 6)).astype(np.float32)
    with_dups = np.concatenate([x, x[:20] + 0.05 * rng.normal(size=(20, 6)).astype(np.float32)])
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        index = write_index(Path(tmp), with_dups, chunk=40)
        xn = with_dups / np.linalg.norm(with_dups, axis=1, keepdims=True)
        sims = xn @ xn.T
        for t in (0.99, 0.9, 0.5):
            want = {(i, j) for i, j in zip(*np.nonzero(np.triu(sims >= t, 1)))}
            for block in (7, 40, 1000):
                got = [(u, v, s) for a, b, s_ in D.similar_pairs(index, t, block) for u, v, s in zip(a, b, s_)]
                # pairs within 1e-6 of t may fall either side in float32
                edge = {(i, j) for i, j in want if abs(sims[i, j] - t) < 1e-6}
                assert {(u, v) for u, v, _ in got} ^ want <= edge
                assert all(u < v for u, v, _ in got) and len(got) == len({(u, v) for u, v, _ in got})


def test_hand_built_groups_join_through_a_chain(tmp_path):
    # a0 a1 a2: one tight group; b0-b1 and b1-b2 are close, b0-b2 are not: still one group
    def unit(deg):
        r = np.radians(deg)
        return [np.cos(r), np.sin(r), 0.0, 0.0]
    rows = {"a0": [0, 0, 1, 0], "a1": [0, 0.1, 1, 0], "a2": [0.1, 0, 1, 0],
            "b0": unit(0), "b1": unit(15), "b2": unit(30),          # cos 15 deg = 0.966, cos 30 deg = 0.866
            "c": [0, 0, 0, 1], "d": [0, 0.7, 0, 0.7]}
    names = ["/x/b1.jpg", "/x/a2.jpg", "/x/c.jpg", "/x/b0.jpg", "/x/a0.jpg", "/x/d.jpg", "/x/b2.jpg", "/x/a1.jpg"]
    x = np.array([rows[Path(n).stem] for n in names], np.float32)
    write_index(tmp_path, x, chunk=3, names=names)
    res = D.run_dedup(tmp_path, 0.95, block_rows=2)
    with open(tmp_path / "groups.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["group"], r["size"], r["path"], r["keep"]) for r in table] == [
        ("0", "3", "/x/a0.jpg", "1"), ("0", "3", "/x/a1.jpg", "0"), ("0", "3", "/x/a2.jpg", "0"),
        ("1", "3", "/x/b0.jpg", "1"), ("1", "3", "/x/b1.jpg", "0"), ("1", "3", "/x/b2.jpg", "0")]
    b2 = next(r for r in table if r["path"] == "/x/b2.jpg")
    assert float(b2["similarity"]) == pytest.approx(np.cos(np.radians(30)), abs=1e-6)
    drop = [ln for ln in (tmp_path / "drop.txt").read_text().splitlines() if not ln.startswith("#")]
    assert drop == ["/x/a1.jpg", "/x/a2.jpg", "/x/b1.jpg", "/x/b2.jpg"]
    assert res["groups"] == 2 and res["pairs"] == 5 and res["largest"] == 3 and res["drop"] == 4
    assert (tmp_path / "dedup.png").is_file()
    assert D.run_dedup(tmp_path, 0.999, out=tmp_path / "none")["groups"] == 0


class Thumbnail(nn.Module):
    """A pixel descriptor in place of a trained backbone (none can be downloaded here): the image's
    4x4 grid of mean colours, less their mean. Random-weight networks do not tell photos apart."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        z = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return z - z.mean(1, keepdim=True)


PHOTOS = ["astronaut", "camera", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "moon", "cell",
          "clock", "colorwheel", "page", "text", "hubble_deep_field"]


def planted_folder(root: Path, copied: int = 10) -> dict[str, list[str]]:
    """The photos (longer side 256) and, for the first ``copied``, three near-duplicates each: half
    size, JPEG quality 30, the centre 90%. -> {original: [its copies]}."""
    import skimage.data as d
    root.mkdir(parents=True)
    groups = {}
    for i, name in enumerate(PHOTOS):
        a = getattr(d, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        im = Image.fromarray(a)
        im.thumbnail((256, 256))
        original = root / f"{name}.png"
        im.save(original)
        if i >= copied:
            continue
        w, h = im.size
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=30)
        copies = {f"{name}_half.jpg": im.resize((w // 2, h // 2), Image.Resampling.BILINEAR),
                  f"{name}_q30.jpg": Image.open(buf),
                  f"{name}_crop.png": im.crop((w // 20, h // 20, w - w // 20, h - h // 20))}
        for fname, copy in copies.items():
            copy.save(root / fname, **({"quality": 90} if fname.endswith("_half.jpg") else {}))
        groups[str(original)] = sorted(str(root / f) for f in copies)
    return groups


def test_planted_near_duplicates_are_found_exactly(tmp_path):
    planted = planted_folder(tmp_path / "photos")
    E.embed("thumbnail", str(tmp_path / "photos"), tmp_path / "emb", model=Thumbnail(), img_size=64,
            chunk_size=16, num_workers=0, progress=False)
    res = D.run_dedup(tmp_path / "emb", 0.9, block_rows=8)
    with open(tmp_path / "emb" / "groups.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    found = {}
    for r in table:
        found.setdefault(r["group"], []).append(r["path"])
    want = {frozenset([o, *c]) for o, c in planted.items()}
    assert {frozenset(g) for g in found.values()} == want             # precision and recall 1
    # the original ('name.png') sorts before its copies ('name_...'): the copies are dropped
    drop = [ln for ln in (tmp_path / "emb" / "drop.txt").read_text().splitlines() if not ln.startswith("#")]
    assert sorted(drop) == sorted(c for cs in planted.values() for c in cs)
    assert res["groups"] == 10 and res["largest"] == 4
    # keel shards --exclude reads it: the conversion would keep exactly the originals
    from keel.data.shards_write import list_source
    kept = list_source(tmp_path / "photos", exclude=tmp_path / "emb" / "drop.txt")
    assert sorted(it.file for it in kept.items) == sorted(str(tmp_path / "photos" / f"{n}.png") for n in PHOTOS)
    assert kept.excluded == 30
