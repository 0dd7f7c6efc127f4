"""Decoding one image file robustly into a uint8 RGB tensor.

:func:`load_image` fully decodes any Pillow-readable file to RGB (EXIF orientation applied,
a JPEG without its end-of-image marker rejected, alpha composited on white, 16/32-bit grey
stretched to 8 bits) or raises :class:`~keel.data.errors.BadImageError`;
:func:`_resize_center_crop` and :func:`_pil_to_tensor` turn the result into a square
``(3, size, size)`` uint8 tensor (evaluation's view of an image).

Training sees the whole image instead: :func:`decode_whole` keeps the aspect ratio and scales
the shorter side to :func:`train_side`. Each file is read once; a JPEG much larger than needed
is decoded at a reduced size (Pillow's ``draft``: libjpeg scales while it decodes), the others
through libjpeg-turbo (``torchvision.io.decode_jpeg``) and every other format through Pillow.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
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


def _check_jpeg_end(path: str | os.PathLike, data: bytes | None = None) -> None:
    """Reject a JPEG whose scan never reaches an end-of-image marker.

    libjpeg stops quietly (filling the rest with grey) when garbage in the
    scan data happens to look like a marker, so Pillow "decodes" such files;
    a missing EOI after the first start-of-scan is how they give themselves away.
    Entropy-coded data cannot contain FF D9, so this never rejects a valid file.
    """
    if data is None:
        with open(path, "rb") as fh:
            data = fh.read()
    start_of_scan = data.find(b"\xff\xda")
    # rfind: the marker normally closes the file, so this looks at its last bytes only
    if start_of_scan < 0 or data.rfind(b"\xff\xd9", start_of_scan) < 0:
        raise OSError("JPEG data is truncated or corrupt (no end-of-image marker)")


def load_image(path: str | os.PathLike, data: bytes | None = None,
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Open any Pillow-readable file and return a fully decoded RGB image.

    EXIF orientation is applied; alpha is composited on white; 16/32-bit
    grey and float images are stretched over their own min..max range.
    Raises :class:`BadImageError` for anything that cannot be fully decoded
    (corrupt or truncated data, empty or non-image files, decompression bombs).
    ``data``: the file's bytes, already read (``path`` then only names it in errors).
    ``draft``: a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale at least this (w, h).
    """
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft)
            im.load()
            if im.format in ("JPEG", "MPO"):
                _check_jpeg_end(path, data)
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


def decode_center(path: str | os.PathLike, size: int, data: bytes | None = None,
                  draft: tuple[int, int] | None = None) -> torch.Tensor:
    """Evaluation's decode: uint8 (3, size, size), the shorter side resized to ``size`` and the
    centre cropped (``data``: the file's bytes, when read already; ``draft``: see :func:`load_image`).
    Raises :class:`BadImageError` for a file that does not decode."""
    return _pil_to_tensor(_resize_center_crop(load_image(path, data, draft), size))


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


# ----------------------------------------------------------------------------
# Training: the whole image, aspect kept
# ----------------------------------------------------------------------------

MAX_ASPECT = 2.0    # the longer side is kept within 2x the shorter's target: a panorama cannot
                    # blow up the batch's canvas (every image of a batch is padded to the largest)


def train_side(img_size: int) -> int:
    """Shorter side training images are decoded at: 256 for 224-px views (as ``keel shards``
    stores them), so a random resized crop over the whole image is drawn from real pixels."""
    return max(img_size, round(img_size * 8 / 7))


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _decode_jpeg_tv(data: bytes | list[bytes], device: str = "cpu"):
    """libjpeg-turbo on the CPU, EXIF orientation applied; a list of files on a CUDA device is one
    batched nvJPEG call (which ignores EXIF orientation: keel shards store none)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def as_tensor(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)
    with warnings.catch_warnings():   # torchvision 0.29 points to torchcodec; the decoder still works
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities.*")
        x = [as_tensor(b) for b in data] if isinstance(data, list) else as_tensor(data)
        return decode_jpeg(x, mode=ImageReadMode.RGB, apply_exif_orientation=True, device=device)


def fitted_size(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) scaled so the shorter side is ``side`` and the longer at most ``MAX_ASPECT * side``.
    Small images are enlarged too: on an 8-px image a random resized crop has only a handful of
    distinct boxes (measured: pretraining on 8-px digits from shards lost 6 points of kNN@200
    until they were)."""
    scale = min(side / min(h, w), MAX_ASPECT * side / max(h, w))
    if scale == 1.0:
        return int(h), int(w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def fit_side(image: torch.Tensor, side: int) -> torch.Tensor:
    """(3, h, w) uint8 scaled (antialiased when shrinking) to :func:`fitted_size`, on its device."""
    size = fitted_size(*image.shape[-2:], side)
    if size == tuple(image.shape[-2:]):
        return image
    if image.device.type != "cpu":   # CUDA has no uint8 antialiased resize: in float, rounded back
        x = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)
        return x[0].round_().clamp_(0, 255).to(torch.uint8)
    # 4-D: the uint8 antialiased kernel (a 3-D tensor takes a path 50x slower)
    return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", antialias=True)[0]


def read_file(path: str | os.PathLike) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise BadImageError(f"cannot read image '{os.fspath(path)}': {exc.strerror or exc}") from exc


def decode_whole(path: str | os.PathLike, side: int, data: bytes | None = None, reduce: bool = True) -> torch.Tensor:
    """The whole image as uint8 (3, h, w), aspect kept, scaled by :func:`fit_side`; raises
    :class:`BadImageError` like :func:`load_image` (every file it rejects is rejected here).
    ``reduce=False``: the file is known to be small (shards), so its header is not read to decide
    on a reduced-size decode."""
    if data is None:
        data = read_file(path)
    if _is_jpeg(data):
        h, w = _jpeg_size(data) if reduce else (0, 0)
        short = min(w, h)
        if short >= 2 * side:   # libjpeg decodes at 1/2, 1/4 or 1/8 scale: a fraction of the work
            want = (math.ceil(w * side / short), math.ceil(h * side / short))
            return fit_side(_pil_to_chw(load_image(path, data, draft=want)), side)
        try:
            _check_jpeg_end(path, data)
        except OSError as exc:
            raise BadImageError(f"cannot decode image '{os.fspath(path)}': {exc}") from exc
        try:
            return fit_side(_decode_jpeg_tv(data), side)
        except RuntimeError:   # what libjpeg-turbo refuses, Pillow judges (and names the reason)
            pass
    return fit_side(_pil_to_chw(load_image(path, data)), side)


def _pil_to_chw(im: Image.Image) -> torch.Tensor:
    """(3, H, W) over the (H, W, 3) pixels, not copied: the resize reads channels-last fastest."""
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's start-of-frame marker, (0, 0) if none is found (the decoder
    then judges the file). Reads the few header bytes, not the image."""
    at = 2
    while at + 9 < len(data):
        if data[at] != 0xFF:
            return 0, 0
        marker = data[at + 1]
        if marker == 0xFF:               # fill byte
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[at + 5:at + 7], "big"), int.from_bytes(data[at + 7:at + 9], "big")
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return 0, 0
