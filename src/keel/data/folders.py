"""Folders of image files as a dataset: which files count as images, scanning a folder for
them, class sub-folders as labels, and :func:`collate_skip` for the files that fail to decode.

:class:`ImageFolder` finds image files recursively under a folder and decodes them lazily;
a file that cannot be decoded comes back as ``None`` so :func:`collate_skip` can drop it and
report it instead of crashing a run.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from keel.data.decode import decode_center, decode_whole, train_side
from keel.data.errors import BadImageError, DataError, _check_img_size

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "collate_skip", "pad_images"]


# ----------------------------------------------------------------------------
# Which files count as images
# ----------------------------------------------------------------------------

# Plugins Pillow registers for identification only: it cannot decode their
# pixels, so a file of that kind would always end up skipped as "bad".
_IDENTIFY_ONLY_FORMATS = {"MPEG"}


def _readable_extensions() -> tuple[str, ...]:
    registered = Image.registered_extensions()  # also runs Image.init()
    readable = set()
    for fmt, entry in Image.OPEN.items():
        if fmt in _IDENTIFY_ONLY_FORMATS:
            continue
        factory = entry[0]
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            continue  # BUFR, GRIB, HDF5: need an external handler to decode
        readable.add(fmt)
    # Multi-picture JPEGs (.mpo) are opened by the JPEG plugin.
    if "JPEG" in readable:
        readable.add("MPO")
    return tuple(sorted(ext.lower() for ext, fmt in registered.items() if fmt in readable))


IMAGE_EXTENSIONS: tuple[str, ...] = _readable_extensions()
_EXTENSION_SET = frozenset(IMAGE_EXTENSIONS)
_COMMON_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _EXTENSION_SET


def _looked_for() -> str:
    shown = [e for e in _COMMON_EXTENSIONS if e in _EXTENSION_SET]
    return ", ".join(shown) + f" and {len(IMAGE_EXTENSIONS) - len(shown)} more"


# ----------------------------------------------------------------------------
# Folders as datasets
# ----------------------------------------------------------------------------


def scan_images(root: str) -> list[str]:
    """All image files under ``root`` (recursive, hidden entries skipped), sorted."""
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and _is_image_name(f):
                full = os.path.join(dirpath, f)
                if os.path.isfile(full):
                    found.append(full)
    found.sort()
    return found


def _class_of(path: str, root: str) -> str | None:
    """First-level sub-folder of ``root`` holding ``path`` (None if directly in root)."""
    rel = os.path.relpath(path, root)
    parts = rel.split(os.sep)
    return parts[0] if len(parts) > 1 else None


def _check_labeled(root: str, paths: list[str]) -> list[str]:
    """Classes found under ``root`` for a labeled task, or DataError."""
    loose = [p for p in paths if _class_of(p, root) is None]
    if loose:
        examples = ", ".join(repr(os.path.basename(p)) for p in loose[:3])
        more = ", ..." if len(loose) > 3 else ""
        raise DataError(
            f"'{root}' has {len(loose)} image file(s) directly in it ({examples}{more}); "
            f"a labeled task needs every image inside a class sub-folder, e.g. '{os.path.join(root, 'cats')}'"
        )
    classes = sorted({_class_of(p, root) for p in paths})  # type: ignore[type-var]
    return classes


def _check_enough_classes(root: str, classes: list[str]) -> None:
    if len(classes) < 2:
        listed = ", ".join(repr(c) for c in classes)
        noun = "class" if len(classes) == 1 else "classes"
        raise DataError(
            f"'{root}' has {len(classes)} {noun} ({listed}); "
            "a labeled task needs one sub-folder per class, at least 2"
        )


class ImageFolder(Dataset):
    """Image files found recursively under ``root``, decoded on access.

    ``labeled=True``: the class of a file is its first-level sub-folder under
    ``root``; ``classes`` are sorted (or given, to share an index between
    splits). ``labeled=False``: every label is -1.

    ``__getitem__`` returns ``(uint8 (3, img_size, img_size), label, index)`` or, when the file
    cannot be decoded, ``(reason, label, index)``. ``whole=True`` (training) keeps the whole image
    instead: ``(3, h, w)`` with the aspect ratio kept and the shorter side at
    :func:`~keel.data.decode.train_side` (``img_size * 8/7``), so random resized crops can be drawn
    over all of it; :func:`collate_skip` pads such images into one canvas and records their sizes.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        img_size: int = 32,
        labeled: bool = False,
        classes: Sequence[str] | None = None,
        name: str | None = None,
        paths: Sequence[str] | None = None,
        whole: bool = False,
    ):
        root = os.fspath(root)
        self.whole = bool(whole)
        _check_img_size(img_size)
        if not os.path.isdir(root):
            raise DataError(f"data path '{root}' is not a folder")
        self.root = root
        self.img_size = int(img_size)
        self.labeled = bool(labeled)
        self.name = name if name is not None else (os.path.basename(os.path.abspath(root)) or root)
        if paths is None:
            paths = scan_images(root)
            if not paths:
                raise DataError(f"no image files found under '{root}' (looked for {_looked_for()}, recursively)")
        self.paths = list(paths)
        if self.labeled:
            found = _check_labeled(root, self.paths)
            if classes is None:
                classes = found
                _check_enough_classes(root, list(classes))
            else:
                unknown = sorted(set(found) - set(classes))
                if unknown:
                    raise DataError(f"'{root}' has class folder(s) {unknown} not in the class list {list(classes)}")
            self.classes = list(classes)
            index = {c: k for k, c in enumerate(self.classes)}
            self.labels = torch.tensor([index[_class_of(p, root)] for p in self.paths], dtype=torch.int64)
        else:
            self.classes = list(classes) if classes is not None else []
            self.labels = torch.full((len(self.paths),), -1, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int]:
        label = int(self.labels[i])
        try:
            if self.whole:
                return decode_whole(self.paths[i], train_side(self.img_size)), label, int(i)
            return decode_center(self.paths[i], self.img_size), label, int(i)
        except BadImageError as e:      # the reason travels in the image's place (see collate_skip)
            return skip_reason(e, self.paths[i]), label, int(i)

    def subset(self, indices: torch.Tensor) -> "ImageFolder":
        indices = torch.as_tensor(indices, dtype=torch.int64)
        new = object.__new__(ImageFolder)
        new.__dict__.update(self.__dict__)
        new.paths = [self.paths[int(k)] for k in indices]
        new.labels = self.labels[indices].clone()
        new.classes = list(self.classes)
        return new

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={self.root!r}, n={len(self)}, img_size={self.img_size}, "
            f"labeled={self.labeled}, classes={len(self.classes)}{', whole' if self.whole else ''})"
        )


def read_exclude(path: str | os.PathLike | None, base: str) -> set[str]:
    """The files a list names (``keel dedup``'s drop.txt): one path a line, absolute or relative to
    ``base``, ``#`` lines ignored; normalised paths."""
    if path is None:
        return set()
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh]
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or e
        raise DataError(f"cannot read the exclude list '{os.fspath(path)}': {why}") from None
    return {os.path.normpath(os.path.join(base, ln)) for ln in lines if ln and not ln.startswith("#")}


def skip_reason(e: BadImageError, path: str) -> str:
    """Why a file was skipped, in one line without its path (skipped.txt puts the path first)."""
    detail = str(e).split("': ", 1)[-1].replace(f" '{path}'", "").replace(str(path), "").strip()
    return detail or "cannot decode"


def collate_skip(batch: Sequence[tuple[Any, Any, int]]) -> dict[str, torch.Tensor]:
    """Collate ``(image, label, index)`` items, dropping those whose image is None or, from a
    dataset that says why, a string (their indices go to ``"skipped"``, the reasons to
    ``"reasons"``); images of several sizes are padded into one canvas (see :func:`pad_images`) with
    ``"sizes"``. Labels are ints (-> ``(B,)`` int64) or tensors of one shape (multi-hot,
    (primary, secondary) pairs), stacked; an all-bad batch keeps the label shape with 0 rows."""
    good = [item for item in batch if isinstance(item[0], torch.Tensor)]
    bad = [item for item in batch if not isinstance(item[0], torch.Tensor)]
    skipped = torch.tensor([int(item[2]) for item in bad], dtype=torch.int64)
    sizes = None
    if good:
        images, sizes = pad_images([item[0] for item in good])
    else:
        images = torch.empty((0, 3, 1, 1), dtype=torch.uint8)
    as_tensor = [torch.as_tensor(item[1]) for item in batch]
    if good:
        labels = torch.stack([t for t, item in zip(as_tensor, batch) if isinstance(item[0], torch.Tensor)])
    elif as_tensor:
        labels = as_tensor[0].new_empty((0, *as_tensor[0].shape))
    else:
        labels = torch.empty((0,), dtype=torch.int64)
    out = {
        "images": images,
        "labels": labels,
        "index": torch.tensor([int(item[2]) for item in good], dtype=torch.int64),
        "skipped": skipped,
        "reasons": [item[0] if isinstance(item[0], str) else "cannot decode" for item in bad],
    }
    if sizes is not None:
        out["sizes"] = sizes
    return out


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack (3, h, w) images; when their sizes differ, into a zero canvas of the largest height and
    width, each top-left, with ``sizes`` (B, 2) their own (h, w) (else None: the stack says it)."""
    shapes = {tuple(im.shape[-2:]) for im in images}
    if len(shapes) == 1:
        return torch.stack(list(images)), None
    height = max(s[0] for s in shapes)
    width = max(s[1] for s in shapes)
    canvas = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    for k, im in enumerate(images):
        canvas[k, :, :im.shape[-2], :im.shape[-1]] = im
    return canvas, torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.int64)
