"""Images listed in a CSV file with multi-label or two-level (primary/secondary) labels.

Two CSV forms, told apart by the header (column names are case-insensitive, in any order):

* ``image,labels`` -- multi-label: ``labels`` holds one or more class names separated
  by ``;`` or ``|`` (``cat;dog``).  ``labels`` is a float multi-hot tensor ``(N, C)``.
* ``image,primary,secondary`` -- two-level: one primary and one secondary class per
  image, every secondary class belonging to exactly one primary (``animal,cat``).
  ``labels`` is an int64 tensor ``(N, 2)`` of (primary, secondary) class ids.

Image paths are absolute or relative to the CSV's folder.  Files are decoded lazily
with :func:`keel.data.sources.load_image` and resized like
:class:`~keel.data.sources.ImageFolder`; an undecodable file comes back as ``None``.
Because the label of an item is a tensor rather than an int, batch with
:func:`collate_targets` (which also accepts int labels, so it can stand in for
``collate_skip`` anywhere).

Everything that makes the file unusable -- a missing file, wrong columns, an empty
label, rows naming images that do not exist, a secondary class under two primaries --
raises :class:`~keel.data.sources.DataError` with a one-line message before any image
is decoded.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from keel.data.folders import skip_reason
from keel.data.decode import decode_center
from keel.data.sources import BadImageError, DataError, _check_img_size, collate_skip

__all__ = ["LabeledCSV", "collate_targets", "LABEL_SEPARATORS"]

# Separators accepted between the labels of one image in the multi-label form.
LABEL_SEPARATORS = (";", "|")
_SPLIT_LABELS = re.compile("|".join(re.escape(s) for s in LABEL_SEPARATORS))

_MULTILABEL = ("image", "labels")
_TWOLEVEL = ("image", "primary", "secondary")
_SHOWN = 3  # offending rows quoted in an error message before "..."


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (", ..." if len(items) > _SHOWN else "")


def _read_rows(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header (lower-cased, stripped) and ``(line number, fields)`` of each non-blank row."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader if any(f.strip() for f in row)]
    except UnicodeDecodeError as exc:
        raise DataError(f"'{path}' is not a UTF-8 text file: {exc.reason} at byte {exc.start}") from exc
    except csv.Error as exc:
        raise DataError(f"'{path}' is not a valid CSV file: {exc}") from exc
    except OSError as exc:
        raise DataError(f"cannot read '{path}': {exc.strerror or exc}") from exc
    if header is None or not any(h.strip() for h in header):
        raise DataError(f"'{path}' is empty: expected a header 'image,labels' or 'image,primary,secondary'")
    return [h.strip().lower() for h in header], rows


def _columns(path: str, header: list[str]) -> tuple[str, dict[str, int]]:
    """Which form the header describes ("multilabel"/"twolevel") and each column's position."""
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise DataError(f"'{path}' has duplicated column(s) {duplicated} in its header {header}")
    have = set(header)
    form = "twolevel" if have & {"primary", "secondary"} else "multilabel"
    wanted = _TWOLEVEL if form == "twolevel" else _MULTILABEL
    missing = [c for c in wanted if c not in have]
    unknown = [h for h in header if h not in wanted]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"no column {missing}")
        if unknown:
            parts.append(f"unknown column(s) {unknown}")
        raise DataError(
            f"'{path}' has {' and '.join(parts)} in its header {header}: "
            "expected 'image,labels' (multi-label) or 'image,primary,secondary' (two-level)"
        )
    return form, {c: header.index(c) for c in wanted}


def _class_index(path: str, found: set[str], given: Sequence[str] | None, what: str) -> list[str]:
    if given is None:
        return sorted(found)
    given = [str(c) for c in given]
    unknown = sorted(found - set(given))
    if unknown:
        raise DataError(f"'{path}' has {what} class(es) {unknown[:_SHOWN]}{'...' if len(unknown) > _SHOWN else ''} "
                        f"not in the given list of {len(given)} {what} classes")
    return given


# keel's collate stacks tensor labels too; the name stays for readers of this module
collate_targets = collate_skip


class LabeledCSV(Dataset):
    """Images listed in a CSV file, with multi-label or two-level labels (see the module doc).

    ``classes`` (multi-label) or ``primary_classes`` / ``secondary_classes`` (two-level)
    default to the sorted names found in the file; pass them to share one class index
    between a train and a test file (a name outside the given list is a DataError).

    Attributes: ``kind`` ("multilabel" or "twolevel"), ``paths`` (absolute), ``labels``
    (float32 ``(N, C)`` multi-hot, or int64 ``(N, 2)``), ``img_size``, ``name``, and for
    two-level data ``hierarchy`` (primary name -> set of secondary names seen under it)
    and ``hierarchy_ids`` (the same with class ids, as :class:`keel.evaluate.multilabel.TwoLevelTask`
    takes it).

    ``__getitem__`` returns ``(uint8 (3, img_size, img_size), label row, index)``, or
    ``(None, label row, index)`` when the file cannot be decoded; batch with
    :func:`collate_targets`.
    """

    # How to batch items of this dataset (DataLoader's collate_fn): labels are tensors here.
    collate_fn = staticmethod(collate_targets)

    def __init__(
        self,
        csv_path: str | os.PathLike,
        img_size: int = 32,
        classes: Sequence[str] | None = None,
        primary_classes: Sequence[str] | None = None,
        secondary_classes: Sequence[str] | None = None,
        name: str | None = None,
    ):
        path = os.path.expanduser(os.fspath(csv_path))
        _check_img_size(img_size)
        if not os.path.exists(path):
            raise DataError(f"label file '{path}' does not exist")
        if os.path.isdir(path):
            raise DataError(f"label file '{path}' is a folder, not a CSV file")
        header, rows = _read_rows(path)
        form, col = _columns(path, header)
        if not rows:
            raise DataError(f"'{path}' has a header but no rows")
        if form == "multilabel" and (primary_classes is not None or secondary_classes is not None):
            raise ValueError(f"'{path}' is a multi-label file: give classes=, not primary/secondary_classes=")
        if form == "twolevel" and classes is not None:
            raise ValueError(f"'{path}' is a two-level file: give primary_classes= and secondary_classes=")

        short = [f"line {line}" for line, row in rows if len(row) != len(header)]
        if short:
            raise DataError(f"'{path}' has {len(short)} row(s) without exactly {len(header)} fields "
                            f"({','.join(header)}): {_listing(short)}")

        root = os.path.dirname(os.path.abspath(path))
        self.csv_path = path
        self.root = root
        self.kind = form
        self.img_size = int(img_size)
        self.name = name if name is not None else os.path.splitext(os.path.basename(path))[0]

        # Parse every row first, so that all problems of one kind are reported together.
        empty: list[str] = []
        parsed: list[tuple[str, Any]] = []
        for line, row in rows:
            image = row[col["image"]].strip()
            if form == "multilabel":
                raw = row[col["labels"]]
                target: Any = [t.strip() for t in _SPLIT_LABELS.split(raw)]
                bad = not image or not all(target)
                target = sorted(set(target))
            else:
                target = (row[col["primary"]].strip(), row[col["secondary"]].strip())
                bad = not image or not all(target)
            if bad:
                empty.append(f"line {line} ({','.join(row)!r})")
            parsed.append((image, target))
        if empty:
            what = "image or label" if form == "multilabel" else "image, primary or secondary"
            raise DataError(f"'{path}' has {len(empty)} row(s) with an empty {what}: {_listing(empty)}")

        paths = [os.path.join(root, os.path.expanduser(image)) for image, _ in parsed]
        paths = [os.path.normpath(p) for p in paths]
        absent = [f"line {line} '{image}'" for (line, _), (image, _), p in zip(rows, parsed, paths)
                  if not os.path.isfile(p)]
        if absent:
            raise DataError(f"'{path}' names {len(absent)} image(s) that do not exist "
                            f"(paths are relative to '{root}' unless absolute): {_listing(absent)}")
        self.paths = paths

        if form == "multilabel":
            self.classes = _class_index(path, {c for _, t in parsed for c in t}, classes, "label")
            index = {c: k for k, c in enumerate(self.classes)}
            labels = torch.zeros(len(parsed), len(self.classes), dtype=torch.float32)
            for i, (_, names) in enumerate(parsed):
                labels[i, [index[c] for c in names]] = 1.0
            self.labels = labels
        else:
            # secondary -> (primary, first line naming that pair): a secondary must have one parent.
            parent: dict[str, tuple[str, int]] = {}
            for (line, _), (_, (prim, sec)) in zip(rows, parsed):
                seen = parent.setdefault(sec, (prim, line))
                if seen[0] != prim:
                    raise DataError(
                        f"'{path}': secondary class '{sec}' appears under two primary classes, "
                        f"'{seen[0]}' (line {seen[1]}) and '{prim}' (line {line}); "
                        "each secondary class must belong to one primary"
                    )
            self.primary_classes = _class_index(path, {p for _, (p, _) in parsed}, primary_classes, "primary")
            self.secondary_classes = _class_index(path, set(parent), secondary_classes, "secondary")
            p_index = {c: k for k, c in enumerate(self.primary_classes)}
            s_index = {c: k for k, c in enumerate(self.secondary_classes)}
            self.labels = torch.tensor([[p_index[p], s_index[s]] for _, (p, s) in parsed], dtype=torch.int64)
            self.hierarchy = {}
            for sec, (prim, _) in parent.items():
                self.hierarchy.setdefault(prim, set()).add(sec)

    @property
    def hierarchy_ids(self) -> dict[int, set[int]]:
        """Two-level only: primary id -> set of secondary ids seen under it in this file."""
        if self.kind != "twolevel":
            raise AttributeError("hierarchy_ids exists for two-level (image,primary,secondary) files only")
        p_index = {c: k for k, c in enumerate(self.primary_classes)}
        s_index = {c: k for k, c in enumerate(self.secondary_classes)}
        return {p_index[p]: {s_index[s] for s in secs} for p, secs in self.hierarchy.items()}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        target = self.labels[i]
        try:
            return decode_center(self.paths[i], self.img_size), target, int(i)
        except BadImageError as e:      # the reason travels in the image's place (see collate_skip)
            return skip_reason(e, self.paths[i]), target, int(i)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "LabeledCSV":
        """The items at ``indices``, with the same class lists (and hierarchy) as this dataset."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        new = object.__new__(LabeledCSV)
        new.__dict__.update(self.__dict__)
        new.paths = [self.paths[int(k)] for k in indices]
        new.labels = self.labels[indices].clone()
        if self.kind == "multilabel":
            new.classes = list(self.classes)
        else:
            new.primary_classes = list(self.primary_classes)
            new.secondary_classes = list(self.secondary_classes)
            new.hierarchy = {p: set(s) for p, s in self.hierarchy.items()}
        return new

    def __repr__(self) -> str:
        if self.kind == "multilabel":
            classes = f"classes={len(self.classes)}"
        else:
            classes = f"primary={len(self.primary_classes)}, secondary={len(self.secondary_classes)}"
        return (f"LabeledCSV(path={self.csv_path!r}, kind={self.kind}, n={len(self)}, "
                f"img_size={self.img_size}, {classes})")
