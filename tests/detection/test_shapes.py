"""The generated shapes dataset: same seed same bytes, boxes that are the polygons' extents, areas
by the shapes' formulas, pixels painted where pycocotools rasterizes the polygons, and a file that
pycocotools and keel's reader both load."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from keel.detection.annotations import BACKGROUND, read_annotations
from keel.detection.dataset import DetectionDataset
from keel.detection.shapes import SHAPES, make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), n_images=12, seed=1)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, shapes):
    again = make_shapes(tmp_path / "again", n_images=12, seed=1)
    other = make_shapes(tmp_path / "other", n_images=12, seed=2)
    assert _files(again.parent) == _files(shapes.parent)
    assert other.read_bytes() != shapes.read_bytes()
    assert len(_files(shapes.parent)) == 13  # 12 PNGs and the JSON


def test_boxes_are_the_polygon_extents_and_objects_do_not_overlap(shapes):
    data = json.loads(shapes.read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPES)
    per_image = {}
    for ann in data["annotations"]:
        (poly,) = ann["segmentation"]
        xs, ys = poly[0::2], poly[1::2]
        assert ann["bbox"] == [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        w, h = ann["bbox"][2:]
        assert 20 <= w <= 60 and 20 <= h <= 60 and ann["iscrowd"] == 0
        shape = SHAPES[ann["category_id"] - 1]
        expected = {"rectangle": w * h, "triangle": w * h / 2,
                    # a 32-gon inscribed in the ellipse: 16 rx ry sin(2 pi / 32); vertices rounded to 0.01
                    "ellipse": 16 * (w / 2) * (h / 2) * math.sin(2 * math.pi / 32)}[shape]
        assert ann["area"] == pytest.approx(expected, rel=1e-3)
        assert len(poly) == {"rectangle": 8, "triangle": 6, "ellipse": 64}[shape]
        per_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    assert sorted(per_image) == list(range(1, 13)) and all(1 <= len(b) <= 4 for b in per_image.values())
    for boxes in per_image.values():
        for i, (x, y, w, h) in enumerate(boxes):
            for u, v, s, t in boxes[i + 1:]:
                assert x + w < u or u + s < x or y + h < v or v + t < y
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3}


def test_pycocotools_masks_cover_the_painted_shapes(shapes):
    coco = COCO(str(shapes))
    for image_id in (1, 2, 3):
        info = coco.imgs[image_id]
        pixels = np.asarray(Image.open(shapes.parent / info["file_name"])).astype(int)
        assert pixels.shape == (128, 128, 3)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            mask = coco.annToMask(ann).astype(bool)
            # one pixel in from the outline both rasterizers agree: a single saturated colour
            inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
            colours = np.unique(pixels[inner], axis=0)
            assert len(colours) == 1 and colours[0].max() - colours[0].min() >= 200
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
            assert abs(xs.max() + 1 - (x + w)) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1


def test_keel_reads_the_shapes(shapes):
    ann = read_annotations(shapes)
    assert ann.classes == [BACKGROUND, *SHAPES] and len(ann) == 12 and ann.skipped == {}
    image, target = DetectionDataset(ann, with_masks=True)[0]
    assert image.shape == (3, 128, 128) and target["masks"].shape[0] == len(target["boxes"])


def test_subset_of_classes_and_bad_arguments(tmp_path):
    data = json.loads(make_shapes(tmp_path / "two", n_images=3, classes=("triangle", "ellipse")).read_text())
    assert [c["name"] for c in data["categories"]] == ["triangle", "ellipse"]
    with pytest.raises(ValueError, match="classes must be distinct names"):
        make_shapes(tmp_path / "bad", classes=("circle",))
    with pytest.raises(ValueError, match="max_side"):
        make_shapes(tmp_path / "bad", size=32, max_side=60)
