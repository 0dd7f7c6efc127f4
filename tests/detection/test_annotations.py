"""Detection annotations: the CSV, VOC and COCO readers on hand-written fixtures (every kind of bad
row, in error and skip mode), VOC and CSV agreeing, a COCO round trip checked by pycocotools, and
the dataset's images, targets, masks, crops and transforms against the pixels and hand formulas."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms import v2

from keel.data.errors import BadImageError, DataError
from keel.detection.annotations import BACKGROUND, Record, read_annotations
from keel.detection.dataset import DetectionDataset, to_coco, write_coco

W, H = 40, 30  # every fixture image; "a.png" and "b.png"


def _png(path: Path, seed: int = 0, size=(W, H)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def folder(tmp_path):
    _png(tmp_path / "a.png", 0)
    _png(tmp_path / "b.png", 1)
    return tmp_path


def _csv(folder: Path, *rows: str) -> Path:
    path = folder / "boxes.csv"
    path.write_text("\n".join(["image_path,xmin,ymin,xmax,ymax,label", *rows]) + "\n")
    return path


def _voc(folder: Path, filename: str, objects, name: str | None = None, size=(W, H)) -> Path:
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
                   f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                   for n, b in objects)
    path = folder / (name or Path(filename).stem + ".xml")
    path.write_text(f"<annotation><folder>x</folder><filename>{filename}</filename><size><width>{size[0]}"
                    f"</width><height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")
    return path


# ---------------------------------------------------------------------------- CSV


def test_csv_reads_boxes_classes_sizes_and_empty_images(folder):
    path = _csv(folder, "a.png,1,2,11,12,Tree", "b.png,0,0,0,0,Tree", "a.png,-0.5,3,40.75,9,Dead")
    ann = read_annotations(path)
    assert ann.classes == [BACKGROUND, "Dead", "Tree"]  # sorted names after the background
    a, b = ann.records
    assert (a.image_path, a.width, a.height, a.image_id) == (str(folder / "a.png"), W, H, 1)
    # the second box sticks out by 0.5 and 0.75 px: inside the 1 px tolerance, so clipped
    assert a.boxes.tolist() == [[1, 2, 11, 12], [0, 3, 40, 9]]
    assert a.labels.tolist() == [2, 1] and a.iscrowd.tolist() == [0, 0] and a.masks is None
    assert len(b.boxes) == 0 and b.image_id == 2  # deepforest's all-zero row: an image without objects
    assert ann.skipped == {} and ann.num_boxes == 2


BAD_ROWS = [
    ("a.png,0,0,41.5,10,Tree", "outside_image", "outside the 40x30 image"),
    ("a.png,-2,0,10,10,Tree", "outside_image", "by more than 1 px"),
    ("a.png,5,5,5,9,Tree", "empty_box", "zero or negative area"),
    ("a.png,9,5,5,9,Tree", "empty_box", "zero or negative area"),
    ("a.png,40.5,5,41,9,Tree", "empty_box", "zero area inside"),
    ("a.png,x,5,9,9,Tree", "not_a_number", "not four finite numbers"),
    ("a.png,nan,5,9,9,Tree", "not_a_number", "not four finite numbers"),
    ("a.png,1,5,9", "not_a_number", "not four finite numbers"),
    ("missing.png,1,1,5,5,Tree", "missing_image", "does not exist"),
    ("notes.png,1,1,5,5,Tree", "unreadable_image", "not a readable image"),
    ("a.png,1,1,5,5,Bird", "unknown_label", "'Bird' is not one of ['Tree']"),
    ("a.png,1,1,5,5,", "unknown_label", "'' is not one of ['Tree']"),
]


@pytest.mark.parametrize("row, reason, detail", BAD_ROWS)
def test_csv_bad_rows_raise_naming_file_and_line_or_are_counted(folder, row, reason, detail):
    (folder / "notes.png").write_text("not an image")
    path = _csv(folder, "b.png,1,1,9,9,Tree", row)
    with pytest.raises(DataError) as err:
        read_annotations(path, classes=["Tree"])
    message = str(err.value)
    assert message.startswith(f"{path}, line 3: ") and detail in message and "\n" not in message
    ann = read_annotations(path, on_bad="skip", classes=["Tree"])
    assert ann.skipped == {reason: 1} and ann.problems == [(f"{path}, line 3", reason)]
    assert ann.num_boxes == 1  # the good row survives
    if reason == "unknown_label":  # without a class list, only an empty label is unknown
        assert read_annotations(path, on_bad="skip").num_boxes == 2 - (row.endswith(","))


def test_csv_without_the_header_and_unknown_inputs_are_errors(folder):
    (folder / "bad.csv").write_text("path,x0,y0,x1,y1,label\na.png,1,1,5,5,Tree\n")
    with pytest.raises(DataError, match=r"missing column\(s\) image_path, xmin, ymin, xmax, ymax"):
        read_annotations(folder / "bad.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_annotations(folder / "nothing.csv")
    (folder / "boxes.txt").write_text("")
    with pytest.raises(DataError, match="unknown annotation format"):
        read_annotations(folder / "boxes.txt")
    with pytest.raises(ValueError, match="on_bad must be"):
        read_annotations(_csv(folder, "a.png,1,1,5,5,Tree"), on_bad="ignore")


def test_images_root_overrides_the_csv_folder(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("labels")
    path = _csv(elsewhere, "a.png,1,1,5,5,Tree")
    assert read_annotations(path, images_root=folder).records[0].image_path == str(folder / "a.png")
    with pytest.raises(DataError, match="line 2: image file .* does not exist"):
        read_annotations(path)


# ---------------------------------------------------------------------------- VOC


def test_voc_folder_and_csv_give_the_same_records(folder):
    _voc(folder, "a.png", [("Tree", (1, 2, 11, 12)), ("Dead", (20.5, 3, 30, 29))])
    _voc(folder, "b.png", [("Tree", (5, 5, 9, 9))])
    csv_path = _csv(folder, "b.png,5,5,9,9,Tree", "a.png,1,2,11,12,Tree", "a.png,20.5,3,30,29,Dead")
    voc, tab = read_annotations(folder), read_annotations(csv_path)
    assert voc.classes == tab.classes == [BACKGROUND, "Dead", "Tree"]
    assert len(voc) == len(tab) == 2
    for r, s in zip(voc, tab):
        assert (r.image_path, r.width, r.height, r.image_id) == (s.image_path, s.width, s.height, s.image_id)
        assert torch.equal(r.boxes, s.boxes) and torch.equal(r.labels, s.labels)
    assert voc[0].boxes.tolist() == [[1, 2, 11, 12], [20.5, 3, 30, 29]]


def test_voc_size_falls_back_to_the_file_header(folder):
    path = _voc(folder, "a.png", [("Tree", (1, 1, 39, 29))], size=(0, 0))
    assert (read_annotations(path)[0].width, read_annotations(path)[0].height) == (W, H)


def test_voc_bad_objects_and_files(folder):
    path = _voc(folder, "a.png", [("Tree", (1, 1, 5, 5)), ("Tree", ("a", 1, 5, 5)), ("Tree", (1, 1, 50, 5))])
    with pytest.raises(DataError, match=rf"^{path}, object 2: .*not four finite numbers"):
        read_annotations(path)
    ann = read_annotations(path, on_bad="skip")
    assert ann.skipped == {"not_a_number": 1, "outside_image": 1} and ann.num_boxes == 1
    assert [w for w, _ in ann.problems] == [f"{path}, object 2", f"{path}, object 3"]
    (folder / "broken.xml").write_text("<annotation><filename>b.png")
    ann = read_annotations(folder, on_bad="skip")
    assert ann.skipped == {"not_a_number": 1, "outside_image": 1, "bad_file": 1} and len(ann) == 1
    with pytest.raises(DataError, match="broken.xml: not a readable XML file"):
        read_annotations(folder / "broken.xml")


# ---------------------------------------------------------------------------- COCO


def _square_rle(x0, y0, x1, y1) -> dict:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _coco(folder: Path, *extra_anns: dict, extra_images=()) -> Path:
    data = {
        "images": [{"id": 10, "file_name": "a.png", "width": W, "height": H},
                   {"id": 20, "file_name": "b.png"}, *extra_images],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],  # gaps, out of order
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [10, 5, 10, 10], "iscrowd": 0,
             "segmentation": [[10, 5, 20, 5, 20, 15, 10, 15]]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [2, 20, 6, 8], "iscrowd": 1,
             "segmentation": _square_rle(2, 20, 8, 28)},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [25, 1, 5, 5], "segmentation": []},
            *extra_anns],
    }
    path = folder / "coco.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_reader_maps_category_ids_and_keeps_segmentations(folder):
    ann = read_annotations(_coco(folder))
    assert ann.classes == [BACKGROUND, "cat", "dog"]  # labels in increasing category-id order
    a, b = ann.records
    assert (a.image_id, b.image_id, b.width, b.height) == (10, 20, W, H)  # b's size from its header
    assert a.boxes.tolist() == [[10, 5, 20, 15], [2, 20, 8, 28], [25, 1, 30, 6]]
    assert a.labels.tolist() == [2, 1, 1] and a.iscrowd.tolist() == [0, 1, 0]
    assert a.masks[0] == [[10, 5, 20, 5, 20, 15, 10, 15]] and a.masks[1]["size"] == [H, W] and a.masks[2] is None
    assert len(b.boxes) == 0 and b.masks == []  # the file has segmentations: an empty list


def test_coco_classes_argument_orders_labels_by_name(folder):
    ann = read_annotations(_coco(folder), classes=["dog", "cat"])
    assert ann.classes == [BACKGROUND, "dog", "cat"] and ann[0].labels.tolist() == [1, 2, 2]


BAD_ANNS = [
    ({"id": 99, "image_id": 10, "category_id": 5, "bbox": [1, 1, 4, 4]}, "unknown_label", "category id 5"),
    ({"id": 99, "image_id": 30, "category_id": 3, "bbox": [1, 1, 4, 4]}, "unknown_image", "image id 30"),
    ({"id": 99, "image_id": 10, "category_id": 3, "bbox": [1, "a", 4, 4]}, "not_a_number", "bbox"),
    ({"id": 99, "image_id": 10, "category_id": 3, "bbox": [1, 1, 4]}, "not_a_number", "bbox"),
    ({"id": 99, "image_id": 10, "category_id": 3, "bbox": [1, 1, 0, 4]}, "empty_box", "zero or negative"),
    ({"id": 99, "image_id": 10, "category_id": 3, "bbox": [30, 1, 12, 4]}, "outside_image", "outside"),
    ({"id": 99, "image_id": 10, "category_id": 3, "bbox": [1, 1, 4, 4], "segmentation": [[1, 1, 5, 5]]},
     "bad_segmentation", "segmentation"),
    ({"id": 99, "image_id": 10, "category_id": 3, "bbox": [1, 1, 4, 4],
      "segmentation": {"size": [10, 10], "counts": "abc"}}, "bad_segmentation", "RLE of the image's size 30x40"),
]


@pytest.mark.parametrize("bad, reason, detail", BAD_ANNS)
def test_coco_bad_annotations_name_file_and_annotation_id(folder, bad, reason, detail):
    path = _coco(folder, bad)
    with pytest.raises(DataError) as err:
        read_annotations(path)
    assert str(err.value).startswith(f"{path}, annotation id 99: ") and detail in str(err.value)
    ann = read_annotations(path, on_bad="skip")
    assert ann.skipped == {reason: 1} and ann.problems == [(f"{path}, annotation id 99", reason)]
    assert ann.num_boxes == 3


def test_coco_missing_image_file_drops_the_image(folder):
    path = _coco(folder, {"id": 4, "image_id": 30, "category_id": 3, "bbox": [1, 1, 4, 4]},
                 extra_images=[{"id": 30, "file_name": "gone.png", "width": W, "height": H}])
    with pytest.raises(DataError, match=rf"^{path}, image id 30: image file .*gone.png' does not exist"):
        read_annotations(path)
    ann = read_annotations(path, on_bad="skip")
    assert ann.skipped == {"missing_image": 1} and [r.image_id for r in ann] == [10, 20]
    path.write_text(json.dumps({"images": [{"id": 1}, {"id": 1}], "categories": []}))
    with pytest.raises(DataError, match="image id 1 appears more than once"):
        read_annotations(path)
    (folder / "broken.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="broken.json: not a COCO annotation file"):
        read_annotations(folder / "broken.json")


def test_coco_round_trip_through_pycocotools(folder):
    ann = read_annotations(_coco(folder))
    out = write_coco(folder / "out" / "gt.json", ann.records, ann.classes, images_root=folder)
    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "dog"]
    assert coco.imgs[10]["file_name"] == "a.png" and coco.imgs[20]["width"] == W
    polygon, crowd, boxed = coco.loadAnns(coco.getAnnIds(imgIds=[10]))
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[5:15, 10:20] = 1  # pycocotools fills a rectangle polygon's corners [x0, x1) x [y0, y1)
    assert np.array_equal(coco.annToMask(polygon), expected) and polygon["area"] == 100
    expected_crowd = np.zeros((H, W), dtype=np.uint8)
    expected_crowd[20:28, 2:8] = 1
    assert np.array_equal(coco.annToMask(crowd), expected_crowd) and crowd["iscrowd"] == 1
    assert boxed["bbox"] == [25, 1, 5, 5] and boxed["area"] == 25 and "segmentation" not in boxed
    again = read_annotations(out, images_root=folder)
    assert torch.equal(again[0].boxes, ann[0].boxes) and torch.equal(again[0].labels, ann[0].labels)
    with pytest.raises(DataError, match="classes must start with"):
        to_coco(ann.records, ["cat", "dog"])


# ---------------------------------------------------------------------------- dataset


def test_dataset_items_match_pixels_boxes_and_pycocotools_masks(folder):
    pixels = np.asarray(Image.open(folder / "a.png"))
    path = _coco(folder)
    item_image, target = DetectionDataset(read_annotations(path), with_masks=True)[0]
    assert isinstance(item_image, tv_tensors.Image) and item_image.dtype == torch.uint8
    assert np.array_equal(item_image.permute(1, 2, 0).numpy(), pixels)
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and tuple(target["boxes"].canvas_size) == (H, W)
    # the crowd box is left out of training targets
    assert target["boxes"].tolist() == [[10, 5, 20, 15], [25, 1, 30, 6]] and target["labels"].tolist() == [2, 1]
    assert target["image_id"] == 10 and isinstance(target["masks"], tv_tensors.Mask)
    coco = COCO(str(path))
    assert np.array_equal(target["masks"][0].numpy(), coco.annToMask(coco.anns[1]))
    box_mask = np.zeros((H, W), dtype=np.uint8)
    box_mask[1:6, 25:30] = 1  # no outline given: the box itself
    assert np.array_equal(target["masks"][1].numpy(), box_mask)
    _, with_crowd = DetectionDataset(read_annotations(path), include_crowd=True)[0]
    assert len(with_crowd["boxes"]) == 3 and with_crowd["iscrowd"].tolist() == [0, 1, 0]
    assert "masks" not in with_crowd


def test_dataset_applies_v2_transforms_to_boxes_and_masks(folder):
    ann = read_annotations(_coco(folder))
    plain = DetectionDataset(ann, with_masks=True)[0]
    image, target = DetectionDataset(ann, v2.RandomHorizontalFlip(p=1.0), with_masks=True)[0]
    assert torch.equal(image, plain[0].flip(-1))
    x0, y0, x1, y1 = plain[1]["boxes"].unbind(1)
    assert torch.equal(target["boxes"], torch.stack([W - x1, y0, W - x0, y1], dim=1))  # mirror formula
    assert torch.equal(target["masks"], plain[1]["masks"].flip(-1))


def test_dataset_crops_checks_sizes_and_reports_corrupt_images(folder):
    pixels = np.asarray(Image.open(folder / "a.png"))
    record = Record(str(folder / "a.png"), 20, 16, [[1, 1, 5, 5]], [1], image_id=3, crop=(5, 4, 25, 20))
    image, target = DetectionDataset([record])[0]
    assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels[4:20, 5:25])
    assert tuple(target["boxes"].canvas_size) == (16, 20)
    wrong = Record(str(folder / "a.png"), 41, 30, [[1, 1, 5, 5]], [1])
    with pytest.raises(DataError, match="image is 40x30 but its annotation says 41x30"):
        DetectionDataset([wrong])[0]
    (folder / "a.png").write_bytes((folder / "a.png").read_bytes()[:60])  # truncated PNG
    with pytest.raises(BadImageError, match="cannot decode image"):
        DetectionDataset([record])[0]
    with pytest.raises(DataError, match="differ in length"):
        Record("x.png", 4, 4, [[0, 0, 1, 1]], [1, 2])


# ---------------------------------------------------------------------------- deepforest's data


DEEPFOREST = os.environ.get("KEEL_DEEPFOREST_DATA")


@pytest.mark.skipif(not DEEPFOREST, reason="set KEEL_DEEPFOREST_DATA to deepforest's data/ folder")
def test_deepforest_sample_data_reads_and_agrees():
    root = Path(DEEPFOREST)
    voc = read_annotations(root)  # the folder of four VOC files
    assert len(voc) == 4 and voc.skipped == {}
    assert voc.classes == [BACKGROUND, "Alive", "Dead", "Tree"]
    counts = {Path(r.image_path).name: len(r.boxes) for r in voc}
    assert counts == {"2019_YELL_2_528000_4978000_image_crop2.png": 574,
                      "2019_YELL_2_541000_4977000_image_crop.png": 279, "OSBS_029.tif": 61, "SOAP_061.png": 37}
    # two of the CSVs are the VOC files' twins (example.csv is a different labelling of its image)
    for csv_name, xml_name in [("OSBS_029.csv", "OSBS_029.xml"), ("testfile_multi.csv", "SOAP_061.xml")]:
        tab, one = read_annotations(root / csv_name), read_annotations(root / xml_name)
        assert tab.classes == one.classes and len(tab) == len(one) == 1
        assert torch.equal(tab[0].boxes, one[0].boxes) and torch.equal(tab[0].labels, one[0].labels)
    example = read_annotations(root / "example.csv")
    assert (len(example), example.num_boxes, example[0].width, example[0].height) == (1, 79, 1249, 1035)
    image, target = DetectionDataset(read_annotations(root / "OSBS_029.xml"))[0]  # a GeoTIFF
    assert image.shape == (3, 400, 400) and len(target["boxes"]) == 61
