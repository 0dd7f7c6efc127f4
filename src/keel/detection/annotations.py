"""Detection annotations: read COCO JSON, Pascal VOC XML or a deepforest CSV into one in-memory
form (:class:`Record`) and check every box; :mod:`keel.detection.dataset` serves the records to
torchvision's detectors and writes ground truth back as COCO JSON.

Conventions followed:
- torchvision detectors: boxes XYXY in pixels, labels int64 with 0 reserved for the background,
  so ``classes[0] == "__background__"`` and label ``i`` names ``classes[i]`` (1..C).
- COCO: ``bbox`` is ``[x, y, w, h]``; ``segmentation`` is a list of polygons (flat x, y lists of
  at least 3 points) or an RLE dict of ``size`` ``[h, w]`` (``counts`` a list when uncompressed, a
  string when compressed); ``iscrowd=1`` marks regions COCO evaluation ignores. Category ids may
  have gaps (COCO 2017 uses 1..90), so labels are 1..C in increasing category-id order.
- Pascal VOC: one XML per image with ``<filename>``, ``<size>`` and ``<object>`` (``<name>``,
  ``<bndbox>``). Coordinates are kept as written, as deepforest does, rather than shifting VOC's
  1-based corners by a pixel: a VOC file and its CSV twin then give identical boxes.
- deepforest CSV: header ``image_path,xmin,ymin,xmax,ymax,label``, paths relative to the CSV's
  folder; a row whose four coordinates are all 0 marks an image without objects.
- Training targets drop crowd boxes, as detectron2's dataset mapper does; :func:`to_coco` keeps
  them so that pycocotools can ignore detections matched to them.
Records are sorted by image path (CSV, VOC) or image id (COCO), so readers agree on ids.
"""

from __future__ import annotations

import csv
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

import torch
from PIL import Image

from keel.data.errors import DataError

__all__ = ["BACKGROUND", "Record", "Annotations", "read_annotations"]

BACKGROUND = "__background__"
TOLERANCE = 1.0  # px a box may stick out of its image before it counts as wrong (then clipped)
CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label")
_EXIF_ORIENTATION = 0x0112

Segmentation = Union[list, dict]  # COCO polygons (list of flat lists) or an RLE dict
Window = tuple[int, int, int, int]


@dataclass
class Record:
    """One image and its objects; ``boxes`` are in the pixels of the image the dataset yields,
    i.e. of the ``crop`` window when one is set (``width``/``height`` are then the window's)."""

    image_path: str
    width: int
    height: int
    boxes: torch.Tensor  # (N, 4) float32 XYXY
    labels: torch.Tensor  # (N,) int64 in 1..C
    masks: list[Segmentation | None] | None = None  # per box; None entries fall back to the box
    iscrowd: torch.Tensor | None = None  # (N,) int64; zeros when not given
    image_id: int = 0
    crop: Window | None = None  # (x0, y0, x1, y1) of the source image to cut at load time

    def __post_init__(self) -> None:
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1)
        n = len(self.boxes)
        self.iscrowd = (torch.zeros(n, dtype=torch.int64) if self.iscrowd is None
                        else torch.as_tensor(self.iscrowd, dtype=torch.int64).reshape(-1))
        if len(self.labels) != n or len(self.iscrowd) != n or (self.masks is not None and len(self.masks) != n):
            raise DataError(f"{self.image_path}: boxes, labels, iscrowd and masks differ in length")


@dataclass
class Annotations:
    """What a reader returns: the records, the class names (``classes[0]`` is the background)
    and what was skipped (``skipped``: reason -> count; ``problems``: (where, reason) each).
    A skip drops one annotation, or one image with all of its annotations."""

    records: list[Record]
    classes: list[str]
    skipped: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    @property
    def num_boxes(self) -> int:
        return sum(len(r.boxes) for r in self.records)


class _Report:
    """Raise at the first bad item (``on_bad='error'``) or count it and go on (``'skip'``)."""

    def __init__(self, on_bad: str) -> None:
        if on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        self.on_bad = on_bad
        self.skipped: dict[str, int] = {}
        self.problems: list[tuple[str, str]] = []

    def bad(self, where: str, reason: str, detail: str) -> None:
        if self.on_bad == "error":
            raise DataError(f"{where}: {detail}")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.problems.append((where, reason))


# ---------------------------------------------------------------------------- checks


def _header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file header, as load_image will return it (EXIF-rotated)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # transposed on load
                w, h = h, w
    except (OSError, ValueError, SyntaxError):
        return None
    return w, h


def _image_size(path: str, where: str, rep: _Report, given: tuple[int, int] | None = None):
    if not os.path.isfile(path):
        rep.bad(where, "missing_image", f"image file '{path}' does not exist")
        return None
    size = given if given is not None else _header_size(path)
    if size is None:
        rep.bad(where, "unreadable_image", f"'{path}' is not a readable image")
    return size


def _four_numbers(raw: Any) -> list[float] | None:
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError):
        return None
    return values if len(values) == 4 and all(math.isfinite(v) for v in values) else None


def _fit_box(xyxy: list[float], size: tuple[int, int], image: str, where: str,
             rep: _Report) -> list[float] | None:
    """The box clipped to the image, or None (reported) when empty or outside beyond tolerance."""
    x0, y0, x1, y1 = xyxy
    shown = f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
    if x1 <= x0 or y1 <= y0:
        rep.bad(where, "empty_box", f"{shown} has zero or negative area")
        return None
    w, h = size
    if x0 < -TOLERANCE or y0 < -TOLERANCE or x1 > w + TOLERANCE or y1 > h + TOLERANCE:
        rep.bad(where, "outside_image", f"{shown} lies outside the {w}x{h} image '{image}' "
                f"by more than {TOLERANCE:g} px")
        return None
    box = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]
    if box[2] <= box[0] or box[3] <= box[1]:
        rep.bad(where, "empty_box", f"{shown} has zero area inside the {w}x{h} image '{image}'")
        return None
    return box


def _check_segmentation(seg: Any, size: tuple[int, int]) -> Segmentation | None | bool:
    """The segmentation if valid, None if absent, False if malformed."""
    if seg is None or (isinstance(seg, list) and not seg):
        return None
    if isinstance(seg, dict):
        ok = list(seg.get("size", [])) == [size[1], size[0]] and isinstance(seg.get("counts"), (list, str))
        return seg if ok else False
    if isinstance(seg, list):
        polys = []
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                return False
            try:
                polys.append([float(v) for v in poly])
            except (TypeError, ValueError):
                return False
        return polys
    return False


# ---------------------------------------------------------------------------- readers


@dataclass
class _Image:
    path: str
    size: tuple[int, int]
    boxes: list[list[float]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    wheres: list[str] = field(default_factory=list)  # where each box was read, for messages


def _label_by_name(images: list[_Image], classes: Sequence[str] | None,
                   rep: _Report) -> tuple[list[Record], list[str]]:
    """Records whose labels index the class list (given, else the sorted names seen)."""
    if classes is not None:
        names = [c for c in classes if c != BACKGROUND]
    else:
        names = sorted({n for im in images for n in im.names if n})  # an empty label is no class
    index = {n: i + 1 for i, n in enumerate(names)}
    records = []
    for k, im in enumerate(sorted(images, key=lambda im: im.path)):
        keep = []
        for j, name in enumerate(im.names):
            if name in index:
                keep.append(j)
            else:
                rep.bad(im.wheres[j], "unknown_label", f"label {name!r} is not one of {names}")
        records.append(Record(im.path, im.size[0], im.size[1], [im.boxes[j] for j in keep],
                              [index[im.names[j]] for j in keep], image_id=k + 1))
    return records, [BACKGROUND] + names


def _read_csv(path: str, root: str, rep: _Report, classes):
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                            f"expected the header {','.join(CSV_COLUMNS)}")
        rows: dict[str, list[tuple[int, dict]]] = {}
        for row in reader:
            rows.setdefault((row["image_path"] or "").strip(), []).append((reader.line_num, row))
    images = []
    for name, group in rows.items():
        image_path = os.path.join(root, name)
        size = _image_size(image_path, f"{path}, line {group[0][0]}", rep)
        if size is None:
            continue
        im = _Image(image_path, size)
        for line, row in group:
            where = f"{path}, line {line}"
            raw = [row[c] for c in CSV_COLUMNS[1:5]]
            xyxy = _four_numbers(raw)
            if xyxy is None:
                rep.bad(where, "not_a_number", f"coordinates {raw} are not four finite numbers")
                continue
            if xyxy == [0.0, 0.0, 0.0, 0.0]:  # deepforest's marker for an image without objects
                continue
            box = _fit_box(xyxy, size, image_path, where, rep)
            if box is not None:
                im.boxes.append(box)
                im.names.append((row["label"] or "").strip())
                im.wheres.append(where)
        images.append(im)
    return _label_by_name(images, classes, rep)


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(float(text))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def _read_voc_file(xml_path: str, root: str | None, rep: _Report) -> _Image | None:
    try:
        ann = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        rep.bad(xml_path, "bad_file", f"not a readable XML file ({str(exc).splitlines()[0]})")
        return None
    filename = (ann.findtext("filename") or "").strip()
    if not filename:
        rep.bad(xml_path, "bad_file", "no <filename> element")
        return None
    image_path = os.path.join(root or os.path.dirname(xml_path), filename)
    w, h = _positive_int(ann.findtext("size/width")), _positive_int(ann.findtext("size/height"))
    size = _image_size(image_path, xml_path, rep, (w, h) if w and h else None)
    if size is None:
        return None
    im = _Image(image_path, size)
    for k, obj in enumerate(ann.findall("object"), 1):
        where = f"{xml_path}, object {k}"
        raw = [obj.findtext(f"bndbox/{t}") for t in ("xmin", "ymin", "xmax", "ymax")]
        xyxy = _four_numbers(raw)
        if xyxy is None:
            rep.bad(where, "not_a_number", f"<bndbox> {raw} is not four finite numbers")
            continue
        box = _fit_box(xyxy, size, image_path, where, rep)
        if box is not None:
            im.boxes.append(box)
            im.names.append((obj.findtext("name") or "").strip())
            im.wheres.append(where)
    return im


def _read_voc(path: str, root: str | None, rep: _Report, classes):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(".xml"))
        if not files:
            raise DataError(f"{path}: no Pascal VOC .xml files in this folder")
    else:
        files = [path]
    images = [im for f in files if (im := _read_voc_file(f, root, rep)) is not None]
    return _label_by_name(images, classes, rep)


def _load_coco(path: str) -> tuple[dict[int, str], dict[int, dict], list[dict]]:
    """Categories (id -> name), image entries by id and the annotations of a COCO file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        ids = [int(entry["id"]) for entry in data["images"]]
        anns = list(data.get("annotations", []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a COCO annotation file ({type(exc).__name__}: {exc})") from exc
    twice = [i for i, n in Counter(ids).items() if n > 1]
    if twice:
        raise DataError(f"{path}: image id {twice[0]} appears more than once in 'images'")
    return cats, dict(zip(ids, data["images"])), anns


def _coco_object(ann: dict, where: str, image: tuple[str, tuple[int, int]], label_of: dict[int, int],
                 rep: _Report) -> tuple | None:
    """(box, label, segmentation, iscrowd) of one annotation, or None (reported)."""
    image_path, size = image
    if ann.get("category_id") not in label_of:
        rep.bad(where, "unknown_label", f"category id {ann.get('category_id')!r} is not in 'categories'")
        return None
    xywh = _four_numbers(ann.get("bbox"))
    if xywh is None:
        rep.bad(where, "not_a_number", f"bbox {ann.get('bbox')!r} is not four finite numbers")
        return None
    x, y, w, h = xywh
    box = _fit_box([x, y, x + w, y + h], size, image_path, where, rep)
    if box is None:
        return None
    seg = _check_segmentation(ann.get("segmentation"), size)
    if seg is False:
        rep.bad(where, "bad_segmentation", "segmentation is neither polygons (>= 3 points) nor an "
                f"RLE of the image's size {size[1]}x{size[0]}")
        return None
    return box, label_of[ann["category_id"]], seg, int(bool(ann.get("iscrowd", 0)))


def _read_coco(path: str, root: str, rep: _Report, classes):
    cats, entries, anns = _load_coco(path)
    if classes is None:
        names = [cats[i] for i in sorted(cats)]
        label_of = {i: k + 1 for k, i in enumerate(sorted(cats))}
    else:
        names = [c for c in classes if c != BACKGROUND]
        label_of = {i: names.index(n) + 1 for i, n in cats.items() if n in names}
    images = {}
    for image_id, entry in entries.items():
        w, h = _positive_int(entry.get("width")), _positive_int(entry.get("height"))
        image_path = os.path.join(root, str(entry.get("file_name", "")))
        size = _image_size(image_path, f"{path}, image id {image_id}", rep, (w, h) if w and h else None)
        if size is not None:
            images[image_id] = (image_path, size)
    objects: dict[int, list[tuple]] = {i: [] for i in images}
    for ann in anns:
        where = f"{path}, annotation id {ann.get('id')}"
        if ann.get("image_id") not in entries:
            rep.bad(where, "unknown_image", f"image id {ann.get('image_id')!r} is not in 'images'")
        elif ann["image_id"] in images:  # else its image was reported already
            obj = _coco_object(ann, where, images[ann["image_id"]], label_of, rep)
            if obj is not None:
                objects[ann["image_id"]].append(obj)
    # one segmentation anywhere makes the file a segmentation source: masks lists for all records
    any_seg = any(o[2] is not None for objs in objects.values() for o in objs)
    records = []
    for image_id in sorted(objects):
        (image_path, (w, h)), objs = images[image_id], objects[image_id]
        records.append(Record(image_path, w, h, [o[0] for o in objs], [o[1] for o in objs],
                              [o[2] for o in objs] if any_seg else None, [o[3] for o in objs], image_id))
    return records, [BACKGROUND] + names


def read_annotations(path: str | os.PathLike, images_root: str | os.PathLike | None = None,
                     on_bad: str = "error", classes: Sequence[str] | None = None) -> Annotations:
    """Read a COCO ``.json``, a deepforest ``.csv``, a VOC ``.xml`` or a folder of VOC XMLs.

    Image paths resolve against ``images_root`` (default: the annotation file's folder).
    ``classes`` fixes the names and their order (label 1 = first name); others become
    ``unknown_label``. ``on_bad='skip'`` drops and counts bad items instead of raising; the
    reasons are ``not_a_number``, ``empty_box``, ``outside_image`` (beyond 1 px; closer is
    clipped), ``unknown_label``, ``bad_segmentation``, ``unknown_image`` (a COCO annotation's
    image id), ``missing_image``, ``unreadable_image`` and ``bad_file`` (a VOC XML).
    """
    path = os.fspath(path)
    rep = _Report(on_bad)
    root = os.fspath(images_root) if images_root is not None else None
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise DataError(f"{path}: annotation file or folder does not exist")
    if os.path.isdir(path) or suffix == ".xml":
        records, names = _read_voc(path, root, rep, classes)
    elif suffix == ".json":
        records, names = _read_coco(path, root or os.path.dirname(path), rep, classes)
    elif suffix == ".csv":
        records, names = _read_csv(path, root or os.path.dirname(path), rep, classes)
    else:
        raise DataError(f"{path}: unknown annotation format (expected .json, .csv, .xml or a folder of .xml)")
    return Annotations(records, names, rep.skipped, rep.problems, path)
