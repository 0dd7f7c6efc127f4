"""Tiling: the grid covers every pixel with the asked overlap, boxes are cut and kept by visible
fraction (hand-computed), the dataset loads the tile's pixels, and merging finds an object cut by a
tile border once (where NMS alone finds it twice)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from keel.detection.annotations import Record
from keel.detection.dataset import DetectionDataset, decode_masks
from keel.detection.tiles import merge_tile_predictions, tile_grid, tile_records


@pytest.mark.parametrize("width, height, tile, overlap", [
    (2000, 1500, 512, 64), (100, 50, 40, 10), (300, 301, 128, 0), (64, 30, 64, 16), (30, 20, 64, 8)])
def test_tile_grid_covers_every_pixel_with_the_overlap(width, height, tile, overlap):
    windows = tile_grid(width, height, tile, overlap)
    cover = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 == min(tile, width) and y1 - y0 == min(tile, height)
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    for starts, length in ((sorted({w[0] for w in windows}), width), (sorted({w[1] for w in windows}), height)):
        steps = np.diff(starts)
        assert starts[0] == 0 and starts[-1] == max(length - tile, 0)  # the last tile flush with the border
        assert (steps[:-1] == tile - overlap).all() and (steps <= tile - overlap).all()  # overlap, or more at the end


def test_tile_grid_hand_case_and_bad_arguments():
    assert tile_grid(100, 40, 40, 10) == [(0, 0, 40, 40), (30, 0, 70, 40), (60, 0, 100, 40)]
    with pytest.raises(ValueError, match=r"overlap must be an integer in \[0, tile=40\)"):
        tile_grid(100, 40, 40, 40)
    with pytest.raises(ValueError, match="tile must be a positive integer"):
        tile_grid(100, 40, 0, 0)


def _scene() -> Record:
    # tiles of 40 px with overlap 10 over 100x40: x windows [0, 40), [30, 70), [60, 100)
    boxes = [[5, 5, 25, 25],     # inside tile 1 only
             [34, 10, 50, 20],   # 6 of 16 px in tile 1 (0.375), whole in tile 2
             [55, 0, 75, 10]]    # 15 of 20 px in tiles 2 and 3 (0.75 each)
    return Record("scene.png", 100, 40, boxes, [1, 2, 1], image_id=7)


def test_tile_records_keep_boxes_by_visible_fraction_and_clip_them():
    tiles = tile_records([_scene()], tile=40, overlap=10, min_visible=0.5)
    assert [t.crop for t in tiles] == [(0, 0, 40, 40), (30, 0, 70, 40), (60, 0, 100, 40)]
    assert [t.image_id for t in tiles] == [1, 2, 3] and all((t.width, t.height) == (40, 40) for t in tiles)
    assert tiles[0].boxes.tolist() == [[5, 5, 25, 25]] and tiles[0].labels.tolist() == [1]
    assert tiles[1].boxes.tolist() == [[4, 10, 20, 20], [25, 0, 40, 10]] and tiles[1].labels.tolist() == [2, 1]
    assert tiles[2].boxes.tolist() == [[0, 0, 15, 10]]
    loose = tile_records([_scene()], tile=40, overlap=10, min_visible=0.25)
    assert loose[0].boxes.tolist() == [[5, 5, 25, 25], [34, 10, 40, 20]]  # 0.375 >= 0.25: kept, clipped
    strict = tile_records([_scene()], tile=40, overlap=10, min_visible=0.8, keep_empty=False)
    assert [t.crop for t in strict] == [(0, 0, 40, 40), (30, 0, 70, 40)]  # tile 3 keeps nothing


def test_tiles_load_their_pixels_and_masks(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    scene = _scene()
    scene.image_path = str(tmp_path / "scene.png")
    scene.masks = [[[5, 5, 25, 5, 15, 25]], None, {"size": [40, 100], "counts": [1, 20, 3979]}]
    full = decode_masks(scene)
    tiles = tile_records([scene], tile=40, overlap=10, min_visible=0.5)
    for t in tiles:
        x0, y0, x1, y1 = t.crop
        image, target = DetectionDataset([t], with_masks=True)[0]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels[y0:y1, x0:x1])
        assert torch.equal(target["boxes"], t.boxes)
    triangle = DetectionDataset([tiles[0]], with_masks=True)[0][1]["masks"][0]
    assert torch.equal(triangle, full[0, :, 0:40]) and triangle.sum() > 0
    # the middle tile's second object is the RLE one, cut at x = 70
    assert torch.equal(DetectionDataset([tiles[1]], with_masks=True)[0][1]["masks"][1], full[2, :, 30:70])
    # tiling a tile composes the crops
    twice = tile_records([tiles[1]], tile=20, overlap=0)
    assert [t.crop for t in twice] == [(30, 0, 50, 20), (50, 0, 70, 20), (30, 20, 50, 40), (50, 20, 70, 40)]


def _pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels)}


def test_an_object_cut_by_a_tile_border_is_found_once():
    windows = tile_grid(220, 100, tile=120, overlap=20)
    assert windows == [(0, 0, 120, 100), (100, 0, 220, 100)]
    full = [40, 30, 130, 60]  # 80 of its 90 px in tile A, 30 in tile B
    preds = [
        _pred([[40, 30, 120, 60], full], [0.9, 0.8], [1, 1]),  # A: the visible part, and the whole object
        _pred([[0, 30, 30, 60]], [0.7], [1]),                  # B: its visible part (image x 100..130)
    ]
    boxes, scores, labels = merge_tile_predictions(preds, windows, iou=0.5)
    assert boxes.tolist() == [full] and scores.tolist() == [pytest.approx(0.8)] and labels.tolist() == [1]
    # NMS alone (containment off) keeps A's cut part, which suppresses the whole box, and B's part
    nms_only = merge_tile_predictions(preds, windows, iou=0.5, contain=2.0)[0]
    assert nms_only.tolist() == [[40, 30, 120, 60], [100, 30, 130, 60]]
    # another class inside the same box is not a copy of it
    preds[1] = _pred([[0, 30, 30, 60]], [0.7], [2])
    assert merge_tile_predictions(preds, windows)[2].tolist() == [1, 2]


def test_merging_a_tiled_scene_finds_every_object_once():
    rng = np.random.default_rng(3)
    objects, taken = [], np.zeros((300, 300), dtype=bool)
    while len(objects) < 25:  # separate objects of 10-40 px: no true neighbour for NMS to remove
        w, h = rng.integers(10, 41, size=2)
        x, y = rng.integers(0, 300 - w), rng.integers(0, 300 - h)
        if not taken[max(y - 3, 0):y + h + 3, max(x - 3, 0):x + w + 3].any():
            taken[y:y + h, x:x + w] = True
            objects.append([x, y, x + w, y + h])
    truth = torch.tensor(objects, dtype=torch.float32)
    labels = torch.tensor(rng.integers(1, 4, size=len(objects)))
    windows = tile_grid(300, 300, tile=128, overlap=48)  # overlap >= the largest object
    preds = []
    for x0, y0, x1, y1 in windows:  # a perfect detector that sees only its tile
        clipped = torch.stack([truth[:, 0].clamp(x0, x1), truth[:, 1].clamp(y0, y1),
                               truth[:, 2].clamp(x0, x1), truth[:, 3].clamp(y0, y1)], dim=1)
        seen = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        offset = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        preds.append({"boxes": clipped[seen] - offset, "scores": torch.rand(int(seen.sum())),
                      "labels": labels[seen]})
    boxes, _, merged_labels = merge_tile_predictions(preds, windows)
    assert len(boxes) == len(objects)
    best = box_iou(boxes, truth).max(dim=1)
    assert (best.values == 1).all() and sorted(best.indices.tolist()) == list(range(len(objects)))
    assert torch.equal(merged_labels, labels[best.indices])


def test_merge_edge_cases():
    boxes, scores, labels = merge_tile_predictions([_pred([], [], [])], [(0, 0, 10, 10)])
    assert boxes.shape == (0, 4) and len(scores) == len(labels) == 0
    with pytest.raises(ValueError, match="2 predictions for 1 windows"):
        merge_tile_predictions([_pred([], [], []), _pred([], [], [])], [(0, 0, 10, 10)])
