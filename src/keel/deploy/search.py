"""``keel search``: the nearest neighbours of query images among a ``keel embed`` folder, by cosine
similarity.

The exact search reads the embeddings block by block into one reused buffer (never the whole
index: memory is one block, ``q x block`` similarities and the running top-k), scores each block
against every query with one matrix product and merges its top-k into the running one, so the
result is the top-k over all rows whatever the block size. With ``faiss`` installed, ``--faiss``
builds an approximate HNSW index once (kept beside the embeddings as ``faiss-hnsw.index``; it
holds every vector in memory) and answers from it.

Writes ``search.csv`` (query, rank, path, similarity; shards add the source path) and
``search.png``: per query (first column) its hits with their similarity.
"""
from __future__ import annotations

import bisect
import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from keel.data.errors import DataError
from keel.deploy.embed import embed_files, load_model, model_fingerprint, open_image, read_index

__all__ = ["iter_blocks", "search", "faiss_search", "paths_of", "query_paths", "run_search"]

MEMORY_BUDGET = 256 << 20      # bytes for one block and its similarities to the queries
QUERY_BATCH = 4096             # more queries than this take several passes over the index
FAISS_FILE, FAISS_META = "faiss-hnsw.index", "faiss-hnsw.json"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, read from its header only."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            offset = fh.tell()
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read embeddings '{path}': {e}") from None
    if fortran or len(shape) != 2:
        raise DataError(f"'{path}' is not a C-ordered (n, dim) array")
    return shape, dtype, offset


def iter_blocks(index: dict, block_rows: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 (b, dim) unit rows) over the index in order from row ``start``, at most
    ``block_rows`` rows at a time (cut per chunk, so a block that began at ``start`` is cut the same
    way again). A block's memory is reused for the next: copy it to keep it."""
    folder, dim = Path(index["folder"]), int(index["dim"])
    buf: np.ndarray | None = None
    for chunk in index["chunks"]:
        skip = start - int(chunk["first"])
        if skip >= int(chunk["count"]):
            continue
        skip = max(skip, 0)
        path = folder / chunk["embeddings"]
        shape, dtype, offset = _npy_header(path)
        if shape != (chunk["count"], dim):
            raise DataError(f"'{path}' holds {shape}, index.json says ({chunk['count']}, {dim}): the folder is damaged")
        if buf is None or buf.dtype != dtype:
            buf = np.empty(block_rows * dim, dtype=dtype)
        with open(path, "rb") as fh:
            fh.seek(offset + skip * dim * dtype.itemsize)
            for a in range(skip, shape[0], block_rows):
                b = min(shape[0], a + block_rows)
                view = buf[:(b - a) * dim]
                if fh.readinto(memoryview(view).cast("B")) != view.nbytes:
                    raise DataError(f"'{path}' is shorter than its header says: the folder is damaged")
                block = torch.from_numpy(view).view(b - a, dim).float()
                # normalised (in place: the buffer is ours) even when stored so: float16 rounding
                # moves the norms off 1 by ~1e-4
                block /= block.norm(dim=1, keepdim=True).clamp_min_(1e-12)
                yield int(chunk["first"]) + a, block


def _block_rows(index: dict, queries: int) -> int:
    dim = int(index["dim"])
    return int(max(256, min(1 << 20, MEMORY_BUDGET // (4 * (dim + queries)))))


@torch.no_grad()
def search(index: dict, queries: np.ndarray, k: int, block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of each query row among the index -> (similarities float32 (q, k),
    rows int64 (q, k)), most similar first; ``k`` is capped at the index's count."""
    k = min(int(k), int(index["count"]))
    if k < 1:
        raise DataError(f"'{index['folder']}' holds no embedding to search")
    q_all = F.normalize(torch.as_tensor(np.asarray(queries), dtype=torch.float32), dim=1)
    if q_all.shape[1] != int(index["dim"]):
        raise DataError(f"queries have dimension {q_all.shape[1]}, the index {index['dim']}")
    scores, rows = [], []
    for q in q_all.split(QUERY_BATCH):
        best_s = q.new_empty((len(q), 0))
        best_r = torch.empty((len(q), 0), dtype=torch.int64)
        for first, block in iter_blocks(index, block_rows or _block_rows(index, len(q))):
            s = q @ block.T
            top = s.topk(min(k, s.shape[1]), dim=1)
            cand_s = torch.cat([best_s, top.values], 1)
            cand_r = torch.cat([best_r, top.indices + first], 1)
            if cand_s.shape[1] > k:
                keep = cand_s.topk(k, dim=1)
                cand_s, cand_r = keep.values, cand_r.gather(1, keep.indices)
            best_s, best_r = cand_s, cand_r
        scores.append(best_s)
        rows.append(best_r)
    return torch.cat(scores).numpy(), torch.cat(rows).numpy()


def faiss_search(index: dict, queries: np.ndarray, k: int, ef_search: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k from an HNSW graph over the whole index (built and saved on first use)."""
    try:
        import faiss
    except ImportError:
        raise DataError("--faiss needs the faiss package: pip install faiss-cpu (or drop --faiss for the "
                        "exact search)") from None
    folder = Path(index["folder"])
    stamp = {"count": index["count"], "created": index.get("created"), "model_sha256": index.get("model_sha256")}
    graph = None
    if (folder / FAISS_FILE).is_file() and (folder / FAISS_META).is_file():
        if json.loads((folder / FAISS_META).read_text()) == stamp:
            graph = faiss.read_index(str(folder / FAISS_FILE))
    if graph is None:
        graph = faiss.IndexHNSWFlat(int(index["dim"]), 32, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 80
        for _, block in iter_blocks(index, 65536):
            graph.add(np.ascontiguousarray(block.numpy(), dtype=np.float32))
        faiss.write_index(graph, str(folder / FAISS_FILE))
        (folder / FAISS_META).write_text(json.dumps(stamp))
    k = min(int(k), int(index["count"]))
    graph.hnsw.efSearch = max(ef_search, 2 * k)
    q = F.normalize(torch.as_tensor(np.asarray(queries), dtype=torch.float32), dim=1).numpy()
    scores, rows = graph.search(np.ascontiguousarray(q), k)
    return scores.astype(np.float32), rows.astype(np.int64)


def paths_of(index: dict, rows: np.ndarray) -> dict[int, list[str]]:
    """Row number -> its ``paths`` CSV row (path, and source for shards), reading only the chunks
    the rows fall in."""
    firsts = [int(c["first"]) for c in index["chunks"]]
    wanted: dict[int, set[int]] = {}
    for r in {int(r) for r in np.asarray(rows).reshape(-1) if r >= 0}:
        c = bisect.bisect_right(firsts, r) - 1
        wanted.setdefault(c, set()).add(r - firsts[c])
    out: dict[int, list[str]] = {}
    for c, local in sorted(wanted.items()):
        path = Path(index["folder"]) / index["chunks"][c]["paths"]
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            for i, row in enumerate(reader):
                if i in local:
                    out[firsts[c] + i] = row
    return out


def query_paths(query: str) -> list[str]:
    """An image file, or every image under a folder (sorted)."""
    from keel.data.folders import scan_images
    path = os.path.expanduser(query)
    if os.path.isdir(path):
        found = scan_images(os.path.abspath(path))
        if not found:
            raise DataError(f"--query '{query}': no image files in this folder")
        return found
    if not os.path.isfile(path):
        raise DataError(f"--query '{query}' does not exist")
    return [os.path.abspath(path)]


def run_search(index_dir: str | os.PathLike, query: str, k: int = 10, out: str | os.PathLike | None = None,
               use_faiss: bool = False, device: str = "cpu", show: int = 8, batch_size: int = 64,
               model: torch.nn.Module | None = None) -> dict:
    """The whole command: embed the queries with the index's model, search, write search.csv and
    search.png into ``out`` (default: the index folder). ``model``: the module an index made with
    ``embed(model=...)`` came from."""
    index = read_index(index_dir)
    if k < 1:
        raise ValueError(f"-k must be at least 1, got {k}")
    paths = query_paths(query)
    size = int(index["img_size"])
    if model is None:
        if not index.get("checkpoint"):
            raise DataError(f"'{index['folder']}' was made with a model given in Python ({index['model']}): "
                            "pass it to run_search(model=...)")
        model = load_model(index["checkpoint"], size)[0]
    if model_fingerprint(model) != index["model_sha256"]:
        raise DataError(f"the model '{index['checkpoint']}' is no longer the one '{index['folder']}' was made "
                        "with (its weights changed): embed again")
    model.eval().to(device)
    feats, kept, bad = embed_files(model, size, paths, batch_size, device, normalize=True)
    if not kept:
        raise DataError(f"no query image could be decoded ({bad[0][0]}: {bad[0][1]})")
    scores, rows = (faiss_search if use_faiss else search)(index, feats, k)
    names = paths_of(index, rows)
    out = Path(out) if out else Path(index["folder"])
    out.mkdir(parents=True, exist_ok=True)
    extra = index["columns"][1:]
    with open(out / "search.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["query", "rank", "path", "similarity", *extra])
        for qi, qpath in enumerate(kept):
            for rank in range(rows.shape[1]):
                r = int(rows[qi, rank])
                if r < 0:       # faiss: fewer hits than asked
                    continue
                row = names[r]
                w.writerow([qpath, rank + 1, row[0], f"{scores[qi, rank]:.6f}", *row[1:]])
    png = _plot_hits(index, kept[:show], rows[:show], scores[:show], names, out / "search.png",
                     approximate=use_faiss) if show > 0 else None
    return {"queries": len(kept), "skipped": bad, "k": int(rows.shape[1]), "csv": str(out / "search.csv"),
            "png": str(png) if png else None, "scores": scores, "rows": rows}


def _plot_hits(index: dict, queries: list[str], rows: np.ndarray, scores: np.ndarray, names: dict, path: Path,
               approximate: bool, side: int = 96, max_k: int = 10) -> Path:
    from keel.data.decode import decode_center
    from keel.data.errors import BadImageError
    from keel.viz.pictures import plot_neighbors

    k = min(rows.shape[1], max_k)
    q_images = []
    for p in queries:
        try:
            q_images.append(decode_center(p, side))
        except BadImageError:
            q_images.append(torch.full((3, side, side), 128, dtype=torch.uint8))
    hits = torch.stack([torch.stack([open_image(index, names[int(r)][0], side) if r >= 0 else
                                     torch.full((3, side, side), 255, dtype=torch.uint8) for r in row[:k]])
                        for row in rows])
    how = "approximate (faiss HNSW)" if approximate else "exact"
    title = f"{how} cosine top-{k} of {index['count']} images ({index['model']})"
    minus = torch.full((len(queries), k), -1)
    return plot_neighbors(torch.stack(q_images), torch.full((len(queries),), -1), hits, minus,
                          torch.as_tensor(scores[:, :k]), path, title=title)
