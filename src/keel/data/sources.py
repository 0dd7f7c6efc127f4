"""Where images come from: choosing among the built-in datasets and folders of image files.

Two dataset classes cover every source:

* :class:`~keel.data.builtins.InMemoryImages` -- a whole dataset held as one uint8 tensor
  (the built-ins ``digits`` and ``fashion-mnist``, see :mod:`keel.data.builtins`).
* :class:`~keel.data.folders.ImageFolder` -- image files found recursively under a folder,
  decoded lazily (see :mod:`keel.data.folders` and :mod:`keel.data.decode`); a file that
  cannot be decoded comes back as ``None`` so :func:`collate_skip` can drop it and report it
  instead of crashing a run.

Both return ``(image, label, index)`` items with ``image`` a uint8 tensor of
shape ``(3, H, W)`` and ``label == -1`` for unlabeled data.

:func:`build_dataset` turns a user-given source string into one of them and
raises :class:`DataError` (a one-line message meant for the user) before any
real work starts when the source is unusable; :func:`labeled_splits` gives the labeled
(train, test) pair evaluation uses.

The public names of those modules are importable from here too, as they always were.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from keel.files import atomic_write_text
from keel.data.builtins import (  # noqa: F401  (re-exported)
    _BUILTINS,
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    InMemoryImages,
    _load_fashion,
    is_fashion_dir,
)
from keel.data.decode import _pil_to_tensor, _resize_center_crop, load_image  # noqa: F401
from keel.data.errors import BadImageError, DataError, _check_img_size  # noqa: F401
from keel.data.shards import ShardSource, is_shards
from keel.data.folders import (  # noqa: F401  (re-exported)
    IMAGE_EXTENSIONS,
    ImageFolder,
    _check_enough_classes,
    _check_labeled,
    scan_images,
    collate_skip,
    read_exclude,
)

__all__ = [
    "DataError",
    "BadImageError",
    "IMAGE_EXTENSIONS",
    "load_image",
    "InMemoryImages",
    "ImageFolder",
    "collate_skip",
    "build_dataset",
    "builtin_names",
    "FASHION_MNIST_CLASSES",
    "DEFAULT_FASHION_MNIST_DIR",
]


def builtin_names() -> list[str]:
    """Names accepted by :func:`build_dataset` besides folder paths."""
    return list(_BUILTINS)


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------

_SPLITS = {"train": "train", "test": "test", "val": "test"}
_SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}


def _split_dirs(folder: str) -> dict[str, str]:
    """Split name ('train'/'test') -> sub-folder path, for folders laid out by split."""
    try:
        entries = {e.name.lower(): e.path for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}
    except OSError as exc:
        raise DataError(f"cannot read data folder '{folder}': {exc}") from exc
    found = {}
    for split, candidates in _SPLIT_FOLDERS.items():
        for c in candidates:
            if c in entries:
                found[split] = entries[c]
                break
    return found


def _build_folder(source: str, split: str, img_size: int, labeled: bool, file_list=None) -> ImageFolder:
    if not os.path.isdir(source):
        raise DataError(f"data path '{source}' is a file, not a folder of images")
    name = os.path.basename(os.path.abspath(source)) or source
    splits = _split_dirs(source)
    if not splits:
        return ImageFolder(source, img_size, labeled, name=name, paths=_cached_files(source, file_list))
    if split not in splits:
        have = ", ".join(f"'{os.path.basename(p)}'" for p in splits.values())
        want = " or ".join(f"'{c}'" for c in _SPLIT_FOLDERS[split])
        raise DataError(f"'{source}' is split into {have} sub-folders but has no {want} sub-folder")
    root = splits[split]
    classes = None
    if labeled:
        # One class list for every split, so label k means the same class in train and test.
        union: set[str] = set()
        for other in splits.values():
            paths = scan_images(other)
            if paths:
                union.update(_check_labeled(other, paths))
        classes = sorted(union)
        _check_enough_classes(root, classes)
    return ImageFolder(root, img_size, labeled, classes=classes, name=name, paths=_cached_files(root, file_list))


def _cached_files(root: str, file_list) -> list[str] | None:
    """The image files under ``root`` from ``file_list`` (a JSON file of paths relative to root),
    or found now and written there; None without a ``file_list`` (ImageFolder walks the folder)."""
    if file_list is None:
        return None
    file_list, root = Path(file_list), os.path.abspath(root)
    if file_list.is_file():
        try:
            saved = json.loads(file_list.read_text())
            if saved.get("root") == root:
                return [os.path.join(root, f) for f in saved["files"]]
        except (ValueError, KeyError, AttributeError):
            pass        # damaged: walk the folder again and rewrite it
    paths = scan_images(root)
    if not paths:
        raise DataError(f"no image files found under '{root}'")
    # whole or not at all: another process of the run may read it while this one writes
    atomic_write_text(file_list, json.dumps({"root": root, "files": [os.path.relpath(p, root) for p in paths]}))
    return paths


def build_dataset(
    source: str,
    split: str = "train",
    img_size: int = 32,
    labeled: bool = False,
    subset: int = 0,
    seed: int = 0,
    file_list: str | os.PathLike | None = None,
) -> InMemoryImages | ImageFolder:
    """Dataset for a built-in name (see :func:`builtin_names`) or a folder path.

    ``split`` is "train" or "test" ("val" means "test"). A folder with
    train/test (or val) sub-folders uses the matching one; otherwise the
    whole folder is used whatever the split. ``subset > 0`` keeps that many
    items chosen at random (deterministic for a given ``seed``). ``file_list``: a folder's files
    are read from this JSON file, or found and written there (see :func:`training_data`).
    Raises :class:`DataError` with a one-line message when unusable.
    """
    key = str(split).lower()
    if key not in _SPLITS:
        raise DataError(f"unknown split '{split}': use train, test or val")
    split = _SPLITS[key]
    _check_img_size(img_size)
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 0:
        raise DataError(f"subset must be a non-negative integer, got {subset!r}")
    source = os.fspath(source)

    if source in _BUILTINS:
        # Built-ins always carry their true labels; ``labeled`` only matters for folders.
        dataset: InMemoryImages | ImageFolder = _BUILTINS[source](split, int(img_size))
    elif os.path.isdir(os.path.expanduser(source)) and is_fashion_dir(os.path.expanduser(source)):
        dataset = _load_fashion(split, int(img_size), os.path.expanduser(source))
    elif os.path.exists(os.path.expanduser(source)):
        dataset = _build_folder(os.path.expanduser(source), split, int(img_size), labeled, file_list)
    else:
        raise DataError(
            f"data path '{source}' does not exist (and is not a built-in dataset: {', '.join(builtin_names())})"
        )

    if 0 < subset < len(dataset):
        generator = torch.Generator().manual_seed(int(seed))
        keep = torch.randperm(len(dataset), generator=generator)[:subset].sort().values
        dataset = dataset.subset(keep)
    return dataset


CROP_FROM = ("whole", "center")


def check_crop_from(value: str) -> None:
    """data.crop_from: training crops over the "whole" image (aspect kept) or the "center" square."""
    if value not in CROP_FROM:
        raise DataError(f"data.crop_from must be whole or center, got {value!r}")


def training_data(source: str, img_size: int, crop_from: str = "whole", subset: int = 0, seed: int = 0,
                  shuffle_buffer: int = 4096, file_list: str | os.PathLike | None = None, exclude: str = ""):
    """What a training job reads: shards (``shards:PATH``, see :mod:`keel.data.shards`), or the
    train split of a built-in or folder. ``crop_from="whole"``: folder images keep their aspect
    ratio (random crops are drawn over the whole image); "center": the centre square, as
    evaluation sees it. ``file_list``: a folder's list of files, cached there on the first call
    and read back after (a large folder is walked once; a resumed run sees the same files).
    ``exclude``: a file listing images to leave out (``keel dedup``'s drop.txt), folders only."""
    check_crop_from(crop_from)
    if is_shards(source):
        if subset:
            raise DataError("data.subset does not apply to shards: make a smaller set with keel shards")
        if exclude:
            raise DataError("data.exclude applies to image folders: for shards, convert again with "
                            "keel shards SRC OUT --exclude FILE")
        return ShardSource(source, img_size, shuffle_buffer, whole=crop_from == "whole")
    dataset = build_dataset(source, "train", img_size, labeled=False, file_list=file_list)
    if exclude:
        if not isinstance(dataset, ImageFolder):
            raise DataError(f"data.exclude applies to image folders, not to '{source}'")
        drop = read_exclude(exclude, dataset.root)
        keep = [i for i, p in enumerate(dataset.paths) if os.path.normpath(p) not in drop]
        if not keep:
            raise DataError(f"every image of '{source}' is in data.exclude '{exclude}'")
        dataset = dataset.subset(torch.tensor(keep))
    if 0 < subset < len(dataset):      # drawn from the files kept
        generator = torch.Generator().manual_seed(int(seed))
        dataset = dataset.subset(torch.randperm(len(dataset), generator=generator)[:subset].sort().values)
    if isinstance(dataset, ImageFolder):
        dataset.whole = crop_from == "whole"
    return dataset


def labeled_splits(source: str, img_size: int = 32) -> tuple[InMemoryImages | ImageFolder, InMemoryImages | ImageFolder]:
    """Labeled (train, test) for evaluation. Built-ins and folders with train/test (or val)
    sub-folders use their own split; any other labeled folder holds out every 5th image (in
    sorted path order) as test, as ``digits`` does, so that accuracy is never measured on the
    images the classifier was fitted on."""
    train = build_dataset(source, "train", img_size, labeled=True)
    test = build_dataset(source, "test", img_size, labeled=True)
    if getattr(train, "paths", None) is not None and train.paths == test.paths:
        ids = torch.arange(len(train))
        train, test = train.subset(ids[ids % 5 != 0]), train.subset(ids[ids % 5 == 0])
        if len(set(train.labels.tolist())) < 2 or len(test) == 0:
            raise DataError(f"'{source}' is too small to hold out a test split (needs images of 2+ classes)")
    return train, test
