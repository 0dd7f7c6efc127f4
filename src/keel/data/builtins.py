"""The built-in datasets, held in memory: ``digits`` (scikit-learn's 8x8 digits) and
``fashion-mnist`` (IDX files from /usr/share/datasets/fashion-mnist or
``KEEL_FASHION_MNIST_DIR``), both as :class:`InMemoryImages`.
"""

from __future__ import annotations

import functools
import gzip
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from keel.data.errors import DataError

__all__ = ["InMemoryImages", "FASHION_MNIST_CLASSES", "DEFAULT_FASHION_MNIST_DIR"]


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
    "(Debian/Ubuntu), which puts it in /usr/share/datasets/fashion-mnist/, or point "
    "KEEL_FASHION_MNIST_DIR (or data.source) at a folder holding its four IDX files (.gz or not)"
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


def is_fashion_dir(directory: str) -> bool:
    """A folder holding Fashion-MNIST's four IDX files (what its download gives), read as the
    built-in data set rather than as a folder of images."""
    return all(_find_idx(directory, stem) for pair in _FASHION_FILES.values() for stem in pair)


def _fashion_paths(split: str, directory: str | None = None) -> tuple[str, str]:
    directory = directory or _fashion_dir()
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
    images_path, labels_path = _fashion_paths(split, directory)
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


def _load_fashion(split: str, img_size: int, directory: str | None = None) -> InMemoryImages:
    directory = directory or _fashion_dir()
    _fashion_paths(split, directory)  # fail fast with the install hint (not cached)
    gray, labels = _fashion_gray(directory, split, img_size)
    return InMemoryImages(_to_three_channels(gray), labels.clone(), FASHION_MNIST_CLASSES, "fashion-mnist")


_BUILTINS = {"digits": _load_digits, "fashion-mnist": _load_fashion}
