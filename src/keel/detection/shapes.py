"""A generated detection dataset for tests and demos: filled shapes on a noisy background.

:func:`make_shapes` writes ``images/NNNNNN.png`` and ``annotations.json`` (COCO) under a folder.
Each image holds 1 to ``max_objects`` shapes, each 20-60 px (by default) across in a 128 px
image, placed without overlap when a free spot is found within a few tries. The class is the
shape (rectangle, ellipse drawn as a 32-gon, triangle) and the colour is random and saturated,
so only the outline tells the classes apart. Every object's segmentation is the exact polygon
that was drawn and its ``bbox`` is that polygon's bounding box ([x, y, w, h], COCO's layout);
``area`` is the polygon's area (shoelace formula). Everything follows from ``seed``: the same
arguments give the same bytes.
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "make_shapes"]

SHAPES = ("rectangle", "ellipse", "triangle")
_ELLIPSE_SIDES = 32  # a multiple of 4, so the polygon touches its box on all four sides
_GAP = 2  # px kept free between shapes, so that no two boxes touch
_TRIES = 30


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey of a random level with Gaussian noise: no colour, so shapes stand out by hue."""
    level = rng.uniform(60, 190)
    noise = rng.normal(0.0, 12.0, size=(size, size, 1))
    return np.clip(np.rint(level + noise), 0, 255).astype(np.uint8).repeat(3, axis=2)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), 1.0, rng.uniform(0.85, 1.0))
    return round(r * 255), round(g * 255), round(b * 255)


def _place(rng: np.random.Generator, size: int, lo: int, hi: int,
           taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    """An integer box (x0, y0, x1, y1) with sides in [lo, hi] clear of ``taken``, or None."""
    for _ in range(_TRIES):
        w, h = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        if all(box[2] + _GAP <= t[0] or t[2] + _GAP <= box[0] or box[3] + _GAP <= t[1]
               or t[3] + _GAP <= box[1] for t in taken):
            return box
    return None


def _polygon(shape: str, box: tuple[int, int, int, int], rng: np.random.Generator) -> list[float]:
    """The shape's outline as a flat [x0, y0, x1, y1, ...] list whose extent is ``box``."""
    x0, y0, x1, y1 = box
    if shape == "rectangle":
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    if shape == "triangle":
        # apex over the middle half, so that no triangle passes for half a rectangle
        apex = float(rng.integers(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4 + 1))
        if rng.random() < 0.5:  # apex up or down: variety without changing the class
            return [x0, y1, x1, y1, apex, y0]
        return [x0, y0, x1, y0, apex, y1]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    points = []
    for k in range(_ELLIPSE_SIDES):
        t = 2 * math.pi * k / _ELLIPSE_SIDES
        points += [round(cx + rx * math.cos(t), 2), round(cy + ry * math.sin(t), 2)]
    return points


def _bbox(poly: list[float]) -> list[float]:
    xs, ys = poly[0::2], poly[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _area(poly: list[float]) -> float:
    xs, ys = np.asarray(poly[0::2], dtype=np.float64), np.asarray(poly[1::2], dtype=np.float64)
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)


def make_shapes(root: str | Path, n_images: int = 64, size: int = 128, seed: int = 0,
                classes: Sequence[str] = SHAPES, min_side: int = 20, max_side: int = 60,
                max_objects: int = 4) -> Path:
    """Write the dataset under ``root`` and return the path of its ``annotations.json``.

    Category ids are 1..len(classes) in the order given; ``classes`` is any non-empty subset of
    :data:`SHAPES`.
    """
    if not classes or len(set(classes)) != len(classes) or any(c not in SHAPES for c in classes):
        raise ValueError(f"make_shapes: classes must be distinct names from {SHAPES}, got {tuple(classes)!r}")
    if not 1 <= min_side <= max_side <= size:
        raise ValueError(f"make_shapes: need 1 <= min_side ({min_side}) <= max_side ({max_side}) <= size ({size})")
    if n_images < 1 or max_objects < 1:
        raise ValueError(f"make_shapes: n_images ({n_images}) and max_objects ({max_objects}) must be >= 1")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(n_images):
        name = f"images/{i:06d}.png"
        picture = Image.fromarray(_background(rng, size))
        draw = ImageDraw.Draw(picture)
        taken: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            box = _place(rng, size, min_side, max_side, taken)
            if box is None:  # crowded: fewer objects rather than overlapping ones
                break
            taken.append(box)
            label = int(rng.integers(len(classes)))
            poly = _polygon(classes[label], box, rng)
            draw.polygon(poly, fill=_colour(rng))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": _bbox(poly), "area": _area(poly), "segmentation": [poly],
                                "iscrowd": 0})
        picture.save(root / name, format="PNG")
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(classes)]
    out = root / "annotations.json"
    out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}),
                   encoding="utf-8")
    return out
