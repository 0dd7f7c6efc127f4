"""Decoding one image file robustly into a uint8 RGB tensor.

:func:`load_image` fully decodes any Pillow-readable file to RGB (EXIF orientation applied,
a JPEG without its end-of-image marker rejected, alpha composited on white, 16/32-bit grey
stretched to 8 bits) or raises :class:`~keel.data.errors.BadImageError`;
:func:`_resize_center_crop` and :func:`_pil_to_tensor` turn the result into a square
``(3, size, size)`` uint8 tensor.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

from keel.data.errors import BadImageError

__all__ = ["load_image"]

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


def count_decodable(paths, limit: int = 5000) -> int | None:
    """How many of ``paths`` decode, for a run's header; None past ``limit`` files (decoding a
    large folder twice is not worth a number the run's end reports anyway)."""
    if len(paths) > limit:
        return None
    good = 0
    for path in paths:
        try:
            load_image(path)
            good += 1
        except BadImageError:
            pass
    return good
