"""``keel dedup``: groups of near-duplicate images in a ``keel embed`` folder, and the files to drop.

Every pair of rows whose cosine similarity is at least the threshold is found exactly, block
against block (each pair once: a block against itself and the blocks after it), so the index is
never whole in memory; the pairs join rows into groups, the connected components (a vectorised
union-find: a pair may link two images through a third that neither is close to on its own).

Writes ``groups.csv`` (group, size, path, keep, similarity to the kept image; groups largest
first), ``dedup.png`` (the largest groups, one per row, the kept image first) and ``drop.txt``:
every image of a group but the first in path order, one per line, which ``keel shards --exclude``
takes (for shards, the paths ``keel shards`` read, so the set can be converted again without them).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

from keel.deploy.embed import open_image, read_index
from keel.deploy.search import iter_blocks, paths_of

__all__ = ["similar_pairs", "components", "find_groups", "run_dedup"]


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The roots of ``x``: follow parents until they stop moving."""
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            return r
        r = up


def union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Join the sets of u[i] and v[i] for every i, in place. A root only ever points to a smaller
    root, so there is no cycle; each round joins at least one pair of roots until none is left."""
    while len(u):
        ru, rv = _find(parent, u), _find(parent, v)
        apart = ru != rv
        if not apart.any():
            return
        u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]
        # several pairs may point one root at different roots: the smallest wins this round
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def components(n: int, edges) -> np.ndarray:
    """(n,) label of each node's component (its smallest member); ``edges``: (u, v) arrays, batch
    by batch (the pairs of a similarity scan arrive block by block)."""
    parent = np.arange(n, dtype=np.int64)
    for u, v in edges:
        union(parent, np.asarray(u, np.int64), np.asarray(v, np.int64))
    return _find(parent, np.arange(n, dtype=np.int64))


@torch.no_grad()
def similar_pairs(index: dict, threshold: float, block_rows: int = 4096):
    """Yield (u, v, similarity) arrays of row pairs (u < v) with cosine >= ``threshold``, block by block."""
    for a0, a in iter_blocks(index, block_rows):
        a = a.clone()       # the generator reuses its buffer; the inner one has its own
        for b0, b in iter_blocks(index, block_rows, start=a0):
            s = a @ b.T
            hit = s >= threshold
            if b0 == a0:    # the block against itself: each pair once, no row with itself
                hit = torch.triu(hit, diagonal=1)
            i, j = hit.nonzero(as_tuple=True)
            if len(i):
                yield (i + a0).numpy(), (j + b0).numpy(), s[i, j].numpy()


def find_groups(index: dict, threshold: float, block_rows: int = 4096) -> tuple[list[np.ndarray], int]:
    """(groups: arrays of rows, largest first, each sorted by row; the number of pairs found)."""
    found = [0]

    def edges():
        for u, v, _ in similar_pairs(index, threshold, block_rows):
            found[0] += len(u)
            yield u, v
    labels = components(int(index["count"]), edges())
    pairs = found[0]
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [g for g in np.split(order, cuts) if len(g) > 1]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups, pairs


def _vectors(index: dict, rows: np.ndarray) -> np.ndarray:
    """float32 unit vectors of a few rows, read through memory maps."""
    firsts = np.array([int(c["first"]) for c in index["chunks"]])
    out = np.empty((len(rows), int(index["dim"])), np.float32)
    chunk_of = np.searchsorted(firsts, rows, side="right") - 1
    for c in np.unique(chunk_of):
        mm = np.load(Path(index["folder"]) / index["chunks"][c]["embeddings"], mmap_mode="r")
        at = np.flatnonzero(chunk_of == c)
        out[at] = mm[rows[at] - firsts[c]]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def run_dedup(index_dir: str | os.PathLike, threshold: float, out: str | os.PathLike | None = None,
              show: int = 8, block_rows: int = 4096) -> dict:
    """The whole command: find the groups, write groups.csv, drop.txt and dedup.png into ``out``
    (default: the index folder)."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine similarity between -1 and 1, got {threshold}")
    index = read_index(index_dir)
    groups, pairs = find_groups(index, threshold, block_rows)
    names = paths_of(index, np.concatenate(groups)) if groups else {}
    # the name an exclusion list needs: the source path for shards, the file path otherwise
    col = index["columns"].index("source") if "source" in index["columns"] else 0
    out = Path(out) if out else Path(index["folder"])
    out.mkdir(parents=True, exist_ok=True)
    table, drop, ordered = [], [], []
    # members in path order (the first is kept), groups largest first, then by their kept path
    groups = [np.array(sorted(rows.tolist(), key=lambda r: (names[r][col], r))) for rows in groups]
    groups.sort(key=lambda rows: (-len(rows), names[rows[0]][col], int(rows[0])))
    for g, rows in enumerate(groups):
        vectors = _vectors(index, rows)
        sims = vectors @ vectors[0]
        for k, (r, sim) in enumerate(zip(rows.tolist(), sims.tolist())):
            table.append([g, len(rows), names[r][0], int(k == 0), f"{sim:.6f}", *names[r][1:]])
            if k:
                drop.append(names[r][col])
        ordered.append((rows, sims))
    with open(out / "groups.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["group", "size", "path", "keep", "similarity", *index["columns"][1:]])
        w.writerows(table)
    with open(out / "drop.txt", "w", encoding="utf-8") as fh:
        fh.write(f"# keel dedup of {index['folder']} at cosine >= {threshold}: {len(drop)} near-duplicates to leave "
                 f"out, one file per line (keel shards --exclude takes this file)\n")
        fh.writelines(p + "\n" for p in drop)
    png = None
    if groups and show > 0:
        png = _plot_groups(index, ordered[:show], names, out / "dedup.png", threshold, len(groups))
    return {"groups": len(groups), "in_groups": int(sum(len(g) for g in groups)), "drop": len(drop), "pairs": pairs,
            "largest": int(len(groups[0])) if groups else 0, "count": int(index["count"]),
            "csv": str(out / "groups.csv"), "drop_file": str(out / "drop.txt"), "png": str(png) if png else None}


def _plot_groups(index: dict, groups: list[tuple[np.ndarray, np.ndarray]], names: dict, path: Path,
                 threshold: float, total: int, max_cols: int = 8, side: int = 96) -> Path:
    from keel.viz.pictures import grid_figure, imshow, save_figure

    # at least 4 columns: room for the title
    cols = max(4, min(max_cols, max(len(rows) for rows, _ in groups)))
    title = f"near-duplicates at cosine >= {threshold}: {len(groups)} largest of {total} groups (row: kept first)"
    fig, axes = grid_figure(len(groups), cols, title)
    for i, (rows, sims) in enumerate(groups):
        for j, r in enumerate(rows[:cols].tolist()):
            imshow(axes[i][j], open_image(index, names[r][0], side))
            label = f"keep · {len(rows)}" if j == 0 else f"{sims[j]:.3f}"
            axes[i][j].set_title(label, fontsize=8, fontweight="bold" if j == 0 else "normal")
    return save_figure(fig, path)
