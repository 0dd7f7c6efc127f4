"""Tests for keel.data.labels: multi-label and two-level CSV datasets, their errors, collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from keel.data.labels import LabeledCSV, collate_targets
from keel.data.sources import DataError, InMemoryImages, collate_skip

COLORS = {"a.png": (200, 30, 40), "b.png": (10, 220, 30), "sub/c.png": (0, 0, 255), "d.png": (90, 90, 90)}


def _write_images(folder, size=(12, 10)):
    for name, color in COLORS.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)


def _csv(folder, text, name="labels.csv"):
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def images(tmp_path):
    _write_images(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------
# the two forms
# ----------------------------------------------------------------------------


def test_multilabel_csv(images):
    absolute = images / "d.png"
    path = _csv(images, f"image,labels\na.png,cat;dog\nb.png, dog | bird \nsub/c.png,bird\n{absolute},cat;cat\n")
    ds = LabeledCSV(path, img_size=8)
    assert ds.kind == "multilabel" and len(ds) == 4
    assert ds.classes == ["bird", "cat", "dog"]
    expected = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.float32)
    assert ds.labels.dtype == torch.float32 and torch.equal(ds.labels, expected)
    for i, name in enumerate(COLORS):
        image, target, index = ds[i]
        assert index == i and torch.equal(target, expected[i])
        # decoded, resized to 8x8 (from 12x10) and laid out channel-first like ImageFolder
        assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
        assert torch.equal(image, torch.tensor(COLORS[name], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))


def test_twolevel_csv_header_any_order_and_case(images):
    path = _csv(images, "Secondary,IMAGE,primary\ncat,a.png,animal\ndog,b.png,animal\n"
                        "car,sub/c.png,vehicle\ncat,d.png,animal\n")
    ds = LabeledCSV(path, img_size=8)
    assert ds.kind == "twolevel"
    assert ds.primary_classes == ["animal", "vehicle"]
    assert ds.secondary_classes == ["car", "cat", "dog"]
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == [[0, 1], [0, 2], [1, 0], [0, 1]]
    assert ds.hierarchy == {"animal": {"cat", "dog"}, "vehicle": {"car"}}
    assert ds.hierarchy_ids == {0: {1, 2}, 1: {0}}
    image, target, index = ds[2]
    assert target.tolist() == [1, 0] and index == 2 and image.shape == (3, 8, 8)


def test_given_class_lists_share_an_index(images):
    path = _csv(images, "image,labels\na.png,dog\n")
    ds = LabeledCSV(path, img_size=8, classes=["bird", "cat", "dog"])
    assert ds.labels.tolist() == [[0.0, 0.0, 1.0]]
    with pytest.raises(DataError, match=r"label class\(es\) \['dog'\] not in the given list"):
        LabeledCSV(path, img_size=8, classes=["bird", "cat"])


def test_subset_keeps_classes_and_rows(images):
    path = _csv(images, "image,primary,secondary\na.png,animal,cat\nb.png,animal,dog\nsub/c.png,vehicle,car\n")
    ds = LabeledCSV(path, img_size=8)
    sub = ds.subset(torch.tensor([2, 0]))
    assert len(sub) == 2 and sub.paths == [ds.paths[2], ds.paths[0]]
    assert sub.labels.tolist() == [[1, 0], [0, 1]]
    assert sub.primary_classes == ds.primary_classes and sub.secondary_classes == ds.secondary_classes
    assert sub.hierarchy_ids == ds.hierarchy_ids
    sub.labels[0, 0] = 0  # a copy, not a view
    assert ds.labels[2, 0] == 1


# ----------------------------------------------------------------------------
# errors: one line each, before any image is decoded
# ----------------------------------------------------------------------------


def _one_line_error(path, **kw) -> str:
    with pytest.raises(DataError) as info:
        LabeledCSV(path, img_size=8, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_and_bad_columns(images):
    assert "does not exist" in _one_line_error(images / "nope.csv")
    assert "is empty" in _one_line_error(_csv(images, ""))
    msg = _one_line_error(_csv(images, "image,label\na.png,cat\n"))
    assert "no column ['labels']" in msg and "unknown column(s) ['label']" in msg
    msg = _one_line_error(_csv(images, "image,labels,extra\na.png,cat,1\n"))
    assert "unknown column(s) ['extra']" in msg
    msg = _one_line_error(_csv(images, "image,primary\na.png,animal\n"))
    assert "no column ['secondary']" in msg
    assert "no rows" in _one_line_error(_csv(images, "image,labels\n"))
    assert "without exactly 2 fields" in _one_line_error(_csv(images, "image,labels\na.png,cat,dog\n"))


def test_empty_labels_are_listed(images):
    msg = _one_line_error(_csv(images, "image,labels\na.png,cat\nb.png,\nsub/c.png,cat;;dog\nd.png,dog;\n"))
    assert "3 row(s) with an empty image or label" in msg
    assert "line 3" in msg and "line 4" in msg and "line 5" in msg and "line 2" not in msg
    msg = _one_line_error(_csv(images, "image,primary,secondary\na.png,animal,\n"))
    assert "1 row(s) with an empty image, primary or secondary" in msg


def test_missing_images_counted_and_first_few_listed(images):
    rows = "".join(f"gone{k}.png,cat\n" for k in range(5))
    msg = _one_line_error(_csv(images, "image,labels\na.png,cat\n" + rows))
    assert "names 5 image(s) that do not exist" in msg
    assert "'gone0.png'" in msg and "'gone2.png'" in msg and "'gone4.png'" not in msg and "..." in msg
    assert "line 4 'gone1.png'" in msg


def test_secondary_under_two_primaries(images):
    msg = _one_line_error(_csv(images, "image,primary,secondary\na.png,animal,mouse\nb.png,animal,cat\n"
                                       "sub/c.png,device,mouse\n"))
    assert "secondary class 'mouse'" in msg and "'animal' (line 2)" in msg and "'device' (line 4)" in msg


# ----------------------------------------------------------------------------
# collate: undecodable images dropped and counted
# ----------------------------------------------------------------------------


def test_corrupt_image_skipped_by_collate(images):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    path = _csv(images, "image,labels\na.png,cat\nbroken.png,dog\nb.png,dog;bird\nsub/c.png,bird\n")
    ds = LabeledCSV(path, img_size=8)
    assert isinstance(ds[1][0], str) and "broken.png" not in ds[1][0]   # the reason, not the path
    batches = list(DataLoader(ds, batch_size=3, shuffle=False, collate_fn=collate_targets))
    skipped = torch.cat([b["skipped"] for b in batches])
    assert skipped.tolist() == [1]
    index = torch.cat([b["index"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert index.tolist() == [0, 2, 3]
    assert labels.shape == (3, 3) and torch.equal(labels, ds.labels[index])
    assert sum(b["images"].shape[0] for b in batches) == 3

    # a batch of only bad images keeps the label shape
    only_bad = collate_targets([ds[1]])
    assert only_bad["images"].shape[0] == 0 and only_bad["labels"].shape == (0, 3)
    assert only_bad["skipped"].tolist() == [1] and only_bad["reasons"] == [ds[1][0]]


def test_collate_targets_matches_collate_skip_on_int_labels():
    ds = InMemoryImages(torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8), torch.tensor([3, 1, 4, 1, 5]))
    batch = [ds[i] for i in range(5)]
    batch[2] = (None, batch[2][1], batch[2][2])
    ours, theirs = collate_targets(batch), collate_skip(batch)
    assert ours.keys() == theirs.keys()
    assert ours["reasons"] == theirs["reasons"] == ["cannot decode"]
    for key in ours.keys() - {"reasons"}:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key])
