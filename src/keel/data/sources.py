"""Where images come from: built-in datasets and folders of image files.

Two dataset classes cover every source:

* :class:`InMemoryImages` -- a whole dataset held as one uint8 tensor (the
  built-ins ``digits`` and ``fashion-mnist``).
* :class:`ImageFolder` -- image files found recursively under a folder,
  decoded lazily; a file that cannot be decoded comes back as ``None`` so
  :func:`collate_skip` can drop it and report it instead of crashing a run.

Both return ``(image, label, index)`` items with ``image`` a uint8 tensor of
shape ``(3, H, W)`` and ``label == -1`` for unlabeled data.

:func:`build_dataset` turns a user-given source string into one of them and
raises :class:`DataError` (a one-line message meant for the user) before any
real work starts when the source is unusable.
"""

from __future__ import annotations

import functools
import gzip
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

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


class DataError(ValueError):
    """A data source cannot be used; the message is one line, for the user."""


class BadImageError(Exception):
    """One image file could not be fully decoded."""


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
# Decoding one file
# ----------------------------------------------------------------------------

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)


def _flatten_alpha(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_to_uint8(im: Image.Image) -> Image.Image:
    """High bit-depth single-channel image -> RGB, stretched over its own range."""
    arr = np.asarray(im).astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(f"unexpected array shape {arr.shape} for mode {im.mode}")
    finite = np.isfinite(arr)
    if not finite.any():
        out = np.zeros(arr.shape, dtype=np.uint8)
    else:
        lo = float(arr[finite].min())
        hi = float(arr[finite].max())
        arr = np.where(finite, arr, lo)
        if hi > lo:
            out = np.rint((arr - lo) * (255.0 / (hi - lo)))
        else:  # constant image: keep the value if it fits, else saturate
            out = np.full(arr.shape, min(max(lo, 0.0), 255.0))
        out = out.clip(0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L").convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _ALPHA_MODES:
        return _flatten_alpha(im)
    if mode in ("P", "L", "RGB", "1") and "transparency" in im.info:
        return _flatten_alpha(im)
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _scale_to_uint8(im)
    # L, 1, P, CMYK, YCbCr, LAB, HSV, ... : Pillow's own conversion.
    return im.convert("RGB")


def _check_jpeg_end(path: str | os.PathLike) -> None:
    """Reject a JPEG whose scan never reaches an end-of-image marker.

    libjpeg stops quietly (filling the rest with grey) when garbage in the
    scan data happens to look like a marker, so Pillow "decodes" such files;
    a missing EOI after the first start-of-scan is how they give themselves away.
    Entropy-coded data cannot contain FF D9, so this never rejects a valid file.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    start_of_scan = data.find(b"\xff\xda")
    if start_of_scan < 0 or data.find(b"\xff\xd9", start_of_scan) < 0:
        raise OSError("JPEG data is truncated or corrupt (no end-of-image marker)")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open any Pillow-readable file and return a fully decoded RGB image.

    EXIF orientation is applied; alpha is composited on white; 16/32-bit
    grey and float images are stretched over their own min..max range.
    Raises :class:`BadImageError` for anything that cannot be fully decoded
    (corrupt or truncated data, empty or non-image files, decompression bombs).
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.format in ("JPEG", "MPO"):
                _check_jpeg_end(path)
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception:  # broken EXIF block: the pixels are still fine
                oriented = im
            rgb = _to_rgb(oriented)
            if rgb is im:  # detach from the file before it is closed
                rgb = im.copy()
            rgb.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImageError(f"cannot decode image '{os.fspath(path)}': {detail}") from exc
    if rgb.mode != "RGB":  # pragma: no cover - defensive
        raise BadImageError(f"cannot decode image '{os.fspath(path)}': mode {rgb.mode}")
    return rgb


def _resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (aspect kept), then center-crop."""
    w, h = im.size
    if (w, h) != (size, size):
        if w <= h:
            nw, nh = size, max(size, round(h * size / w))
        else:
            nw, nh = max(size, round(w * size / h)), size
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left = (nw - size) // 2
        top = (nh - size) // 2
        if (nw, nh) != (size, size):
            im = im.crop((left, top, left + size, top + size))
    return im


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    arr = np.array(im, dtype=np.uint8, copy=True)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------


class InMemoryImages(Dataset):
    """Images held as one uint8 tensor ``(N, 3, H, W)`` with int64 labels ``(N,)``.

    ``labels == -1`` marks unlabeled items. ``paths`` is always ``None``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        classes: Sequence[str] | None = None,
        name: str = "in-memory",
    ):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError("images must be a uint8 tensor")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        n = images.shape[0]
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64)
        labels = torch.as_tensor(labels).to(torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.classes = list(classes) if classes is not None else []
        self.paths = None
        self.name = name

    @property
    def img_size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i], int(self.labels[i]), int(i)

    def subset(self, indices: torch.Tensor) -> "InMemoryImages":
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return InMemoryImages(self.images[indices], self.labels[indices], self.classes, self.name)

    def __repr__(self) -> str:
        h, w = self.images.shape[-2:]
        return f"InMemoryImages(name={self.name!r}, n={len(self)}, size={h}x{w}, classes={len(self.classes)})"


def _scan_images(root: str) -> list[str]:
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

    ``__getitem__`` returns ``(uint8 (3, img_size, img_size), label, index)``
    or ``(None, label, index)`` when the file cannot be decoded.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        img_size: int = 32,
        labeled: bool = False,
        classes: Sequence[str] | None = None,
        name: str | None = None,
        paths: Sequence[str] | None = None,
    ):
        root = os.fspath(root)
        _check_img_size(img_size)
        if not os.path.isdir(root):
            raise DataError(f"data path '{root}' is not a folder")
        self.root = root
        self.img_size = int(img_size)
        self.labeled = bool(labeled)
        self.name = name if name is not None else (os.path.basename(os.path.abspath(root)) or root)
        if paths is None:
            paths = _scan_images(root)
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
            im = load_image(self.paths[i])
        except BadImageError:
            return None, label, int(i)
        im = _resize_center_crop(im, self.img_size)
        return _pil_to_tensor(im), label, int(i)

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
            f"labeled={self.labeled}, classes={len(self.classes)})"
        )


def collate_skip(batch: Sequence[tuple[Any, Any, int]]) -> dict[str, torch.Tensor]:
    """Collate ``(image, label, index)`` items, dropping those whose image is None (their indices
    go to ``"skipped"``). Labels are ints (-> ``(B,)`` int64) or tensors of one shape (multi-hot,
    (primary, secondary) pairs), stacked; an all-bad batch keeps the label shape with 0 rows."""
    good = [item for item in batch if item[0] is not None]
    skipped = torch.tensor([int(item[2]) for item in batch if item[0] is None], dtype=torch.int64)
    if good:
        images = torch.stack([item[0] for item in good])
    else:
        images = torch.empty((0, 3, 1, 1), dtype=torch.uint8)
    as_tensor = [torch.as_tensor(item[1]) for item in batch]
    if good:
        labels = torch.stack([t for t, item in zip(as_tensor, batch) if item[0] is not None])
    elif as_tensor:
        labels = as_tensor[0].new_empty((0, *as_tensor[0].shape))
    else:
        labels = torch.empty((0,), dtype=torch.int64)
    return {
        "images": images,
        "labels": labels,
        "index": torch.tensor([int(item[2]) for item in good], dtype=torch.int64),
        "skipped": skipped,
    }


# ----------------------------------------------------------------------------
# Built-in datasets
# ----------------------------------------------------------------------------

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FASHION_INSTALL = (
    "fashion-mnist is not installed: run `sudo apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu), which puts it in /usr/share/datasets/fashion-mnist/"
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _resize_gray(gray: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8/float (N, H, W) -> uint8 (N, size, size), bilinear with antialias, batched."""
    n, h, w = gray.shape
    if (h, w) == (size, size):
        return gray.round().clamp(0, 255).to(torch.uint8) if gray.is_floating_point() else gray.to(torch.uint8)
    out = torch.empty((n, size, size), dtype=torch.uint8)
    with torch.no_grad():
        for start in range(0, n, chunk):
            x = gray[start:start + chunk].to(torch.float32).unsqueeze(1)
            y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out[start:start + chunk] = y.squeeze(1).round().clamp(0, 255).to(torch.uint8)
    return out


def _to_three_channels(gray: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> new uint8 (N, 3, H, W) owned by the caller."""
    return gray.unsqueeze(1).repeat(1, 3, 1, 1)


@functools.lru_cache(maxsize=4)
def _digits_gray(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) * (255.0 / 16.0))
    return _resize_gray(gray, img_size), torch.from_numpy(np.asarray(bunch.target)).to(torch.int64)


def _load_digits(split: str, img_size: int) -> InMemoryImages:
    gray, labels = _digits_gray(img_size)
    is_test = torch.arange(len(labels)) % 5 == 0
    keep = is_test if split == "test" else ~is_test
    return InMemoryImages(
        _to_three_channels(gray[keep]), labels[keep].clone(), [str(d) for d in range(10)], "digits"
    )


def _fashion_dir() -> str:
    return os.environ.get("KEEL_FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR


def _find_idx(directory: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _fashion_paths(split: str) -> tuple[str, str]:
    directory = _fashion_dir()
    found = []
    for stem in _FASHION_FILES[split]:
        path = _find_idx(directory, stem)
        if path is None:
            msg = _FASHION_INSTALL
            if directory != DEFAULT_FASHION_MNIST_DIR:
                msg += f" (KEEL_FASHION_MNIST_DIR='{directory}' has no {stem}[.gz])"
            raise DataError(msg)
        found.append(path)
    return found[0], found[1]


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions (optionally gzipped)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read '{path}': {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        raise DataError(
            f"'{path}' is not an IDX file of {ndim}-d unsigned bytes (bad magic number {data[:4].hex() or 'empty'})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"'{path}' is truncated (header incomplete)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise DataError(f"'{path}' holds {len(data) - header} data bytes, expected {expected} for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def _fashion_gray(directory: str, split: str, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images_path, labels_path = _fashion_paths(split)
    images = _read_idx(images_path, 3)
    labels = _read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"fashion-mnist {split}: {images.shape[0]} images but {labels.shape[0]} labels "
            f"('{images_path}', '{labels_path}')"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"'{labels_path}' has label {int(labels.max())}, expected 0..9")
    gray = _resize_gray(torch.from_numpy(images.copy()), img_size)
    return gray, torch.from_numpy(labels.astype(np.int64))


def _load_fashion(split: str, img_size: int) -> InMemoryImages:
    _fashion_paths(split)  # fail fast with the install hint (not cached)
    gray, labels = _fashion_gray(_fashion_dir(), split, img_size)
    return InMemoryImages(_to_three_channels(gray), labels.clone(), FASHION_MNIST_CLASSES, "fashion-mnist")


_BUILTINS = {"digits": _load_digits, "fashion-mnist": _load_fashion}


def builtin_names() -> list[str]:
    """Names accepted by :func:`build_dataset` besides folder paths."""
    return list(_BUILTINS)


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------

_SPLITS = {"train": "train", "test": "test", "val": "test"}
_SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}


def _check_img_size(img_size: Any) -> None:
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or img_size < 1:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}")


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


def _build_folder(source: str, split: str, img_size: int, labeled: bool) -> ImageFolder:
    if not os.path.isdir(source):
        raise DataError(f"data path '{source}' is a file, not a folder of images")
    name = os.path.basename(os.path.abspath(source)) or source
    splits = _split_dirs(source)
    if not splits:
        return ImageFolder(source, img_size, labeled, name=name)
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
            paths = _scan_images(other)
            if paths:
                union.update(_check_labeled(other, paths))
        classes = sorted(union)
        _check_enough_classes(root, classes)
    return ImageFolder(root, img_size, labeled, classes=classes, name=name)


def build_dataset(
    source: str,
    split: str = "train",
    img_size: int = 32,
    labeled: bool = False,
    subset: int = 0,
    seed: int = 0,
) -> InMemoryImages | ImageFolder:
    """Dataset for a built-in name (see :func:`builtin_names`) or a folder path.

    ``split`` is "train" or "test" ("val" means "test"). A folder with
    train/test (or val) sub-folders uses the matching one; otherwise the
    whole folder is used whatever the split. ``subset > 0`` keeps that many
    items chosen at random (deterministic for a given ``seed``).
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
    elif os.path.exists(os.path.expanduser(source)):
        dataset = _build_folder(os.path.expanduser(source), split, int(img_size), labeled)
    else:
        raise DataError(
            f"data path '{source}' does not exist (and is not a built-in dataset: {', '.join(builtin_names())})"
        )

    if 0 < subset < len(dataset):
        generator = torch.Generator().manual_seed(int(seed))
        keep = torch.randperm(len(dataset), generator=generator)[:subset].sort().values
        dataset = dataset.subset(keep)
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
