"""Batched SimCLR-style views, computed on the device the batch lives on.

Each image in a batch gets its own random crop, flip, colour jitter, grayscale
and blur parameters, but all images are processed together with a handful of
tensor ops, so a GPU training loop is not limited by CPU data-loader workers.

Randomness comes only from an explicit ``torch.Generator``: the small
per-image parameter tensors are drawn with it (normally on the CPU) and then
moved to the batch's device, so a step is reproducible from (seed, step) on any
device.

Pipeline (SimCLR order): random resized crop + horizontal flip (one
``grid_sample``), colour jitter, grayscale, Gaussian blur, normalisation.
The per-image ops follow the formulas of ``torchvision.transforms.v2.functional``
for float images in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ViewConfig",
    "BatchAugment",
    "two_views",
    "normalize",
    "eval_transform",
    "blur_kernel_size",
]

# Luma weights used by torchvision's rgb_to_grayscale (ITU-R 601-2; torchvision
# spells the red weight 0.2989, which we keep so results agree with it).
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# Number of candidate crop boxes tried per image before the centre-crop fallback
# (the same count torchvision's RandomResizedCrop uses).
_CROP_TRIES = 10


@dataclass
class ViewConfig:
    size: int = 32  # output side
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0  # SimCLR uses 0.5 at 224 px; off by default for small images
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


def blur_kernel_size(size: int) -> int:
    """Odd kernel side of about 10% of the image side (SimCLR), at least 3."""
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


def _to_float(images: Tensor) -> Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating point images, got {images.dtype}")
    return images.to(torch.float32)


def _channel_stats(values: Sequence[float], ref: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=ref.device).view(-1, 1, 1)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Convert to float32 in [0, 1] (uint8 is divided by 255) and apply (x - mean) / std.

    Works for (C, H, W) and (B, C, H, W) inputs; no resizing.
    """
    x = _to_float(images)
    return (x - _channel_stats(mean, x)) / _channel_stats(std, x)


def eval_transform(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Deterministic transform for evaluation / feature extraction.

    Resizes the (B, C, H, W) batch to (size, size) with antialiased bilinear
    interpolation when its spatial size differs (no aspect-preserving crop), then
    normalises like :func:`normalize`.
    """
    x = _to_float(images)
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    out = normalize(x, mean, std)
    return out.squeeze(0) if squeeze else out


def _grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = x.unbind(dim=1)
    wr, wg, wb = _GRAY_WEIGHTS
    return (r * wr + g * wg + b * wb).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    """ratio * a + (1 - ratio) * b, clamped to [0, 1]; ratio has shape (B, 1, 1, 1).

    Written as b + ratio * (a - b) (one fused lerp); with ratio == 1 it returns a exactly.
    """
    return torch.lerp(b.expand_as(a), a, ratio).clamp_(0.0, 1.0)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3, H, W) RGB in [0, 1] -> hue in [0, 6) (sextants), saturation, value; each (B, H, W)."""
    r, g, b = x.unbind(dim=1)
    minc, maxc = torch.aminmax(x, dim=1)
    delta = maxc - minc
    grey = delta == 0
    # Grey pixels (delta == 0) get s = 0 and h = 0; the safe divisors avoid 0/0
    # (delta == 0 whenever maxc == 0).
    s = delta / maxc.masked_fill(grey, 1.0)
    d = delta.masked_fill_(grey, 1.0)
    # Priority red > green > blue when several channels share the maximum.
    is_r = maxc == r
    is_g = maxc == g
    h = torch.where(is_r, g - b, torch.where(is_g, (b - r).add_(d, alpha=2.0), (r - g).add_(d, alpha=4.0)))
    h = h.div_(d).remainder_(6.0)
    return h, s, maxc


def _hsv_to_rgb(h6: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Hue in [0, 6), saturation, value (each (B, H, W)) -> (B, 3, H, W) RGB.

    Uses the closed form c = v - v * s * clamp(min(k, 4 - k), 0, 1) with
    k = (n + h6) mod 6 and n = 5, 3, 1 for R, G, B (same values as the
    sextant table in torchvision's _hsv_to_rgb, up to rounding).
    """
    n = torch.tensor([5.0, 3.0, 1.0], dtype=h6.dtype, device=h6.device).view(1, 3, 1, 1)
    k = (h6.unsqueeze(1) + n).remainder_(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return ramp.mul_((v * s).unsqueeze(1)).neg_().add_(v.unsqueeze(1))


def _adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Rotate hue by hue[i] (a fraction of a full turn, in [-0.5, 0.5]) per image."""
    h6, s, v = _rgb_to_hsv(x)
    h6 = h6.add_(hue.view(-1, 1, 1), alpha=6.0).remainder_(6.0)
    return _hsv_to_rgb(h6, s, v).clamp_(0.0, 1.0)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-image sigma and reflect padding (like torchvision)."""
    b, c, height, width = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - radius
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, k)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, k): same kernel for each channel
    y = x.reshape(1, b * c, height, width)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)  # vertical pass
    y = F.conv2d(y, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)  # horizontal pass
    return y.reshape(b, c, height, width)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device, dtype=dtype) * (high - low) + low


class BatchAugment(torch.nn.Module):
    """Random SimCLR views for a whole batch, with independent parameters per image.

    ``forward(images, generator)`` takes uint8 (or float in [0, 1]) images of
    shape (B, 3, H, W) on any device and returns float32 normalised views of
    shape (B, 3, size, size) on the same device.
    """

    def __init__(self, cfg: ViewConfig):
        super().__init__()
        self.cfg = cfg
        self.kernel_size = blur_kernel_size(cfg.size)
        lo, hi = cfg.ratio
        if lo > hi or cfg.scale[0] > cfg.scale[1]:
            raise ValueError("scale and ratio must be (min, max) pairs")
        if not 0.0 <= cfg.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {cfg.hue}")

    def extra_repr(self) -> str:
        return repr(self.cfg)

    # ------------------------------------------------------------------ params
    def _sample_crops(self, n: int, height, width, generator) -> tuple[Tensor, ...]:
        """Vectorised torchvision RandomResizedCrop.get_params: (top, left, h, w), float64.
        ``height``/``width``: the image side, or one per image ((n,) tensors) when the images of a
        batch have their own sizes (padded into one canvas, see :func:`keel.data.folders.collate_skip`)."""
        cfg = self.cfg
        device = generator.device if generator is not None else "cpu"
        height = torch.as_tensor(height, dtype=torch.float64, device=device).expand(n)
        width = torch.as_tensor(width, dtype=torch.float64, device=device).expand(n)
        area = (height * width).view(n, 1)
        log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
        shape = (n, _CROP_TRIES)
        frac = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        frac = frac * (cfg.scale[1] - cfg.scale[0]) + cfg.scale[0]
        log_r = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        aspect = torch.exp(log_r * (log_hi - log_lo) + log_lo)
        target = area * frac
        # torch.round and Python's round() both round half to even.
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        valid = (w > 0) & (w <= width.view(n, 1)) & (h > 0) & (h <= height.view(n, 1))
        first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid candidate
        found = valid.any(dim=1)
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)

        # Fallback (no valid candidate in 10 tries): centre crop with the ratio clamped.
        in_ratio = width / height
        lo, hi = min(cfg.ratio), max(cfg.ratio)
        fw = torch.where(in_ratio > hi, torch.round(height * hi), width)
        fh = torch.where(in_ratio < lo, torch.round(width / lo), height)
        w = torch.where(found, w, fw)
        h = torch.where(found, h, fh)

        # Uniform integer offsets, like torch.randint(0, H - h + 1).
        u_top = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        u_left = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
        left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
        top = torch.where(found, top, torch.div(height - fh, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(width - fw, 2, rounding_mode="floor"))
        return top, left, h, w

    def sample_params(self, n: int, height, width, generator: Optional[torch.Generator]) -> dict[str, Tensor]:
        """All per-image random parameters, on the generator's device (normally CPU).
        ``height``/``width``: ints, or (n,) tensors of each image's own size (see ``forward``).

        Keys: ``top``, ``left``, ``height``, ``width`` (crop box in input pixels,
        float32), ``flip`` (bool), ``jitter`` (bool), ``brightness``,
        ``contrast``, ``saturation`` (multiplicative factors), ``hue`` (shift in
        turns), ``gray`` (bool), ``blur`` (bool), ``sigma`` (blur sigma, pixels).
        The draws always happen in the same order and number, whatever the
        probabilities, so streams stay aligned across configs.
        """
        if bool((torch.as_tensor(height) <= 0).any() or (torch.as_tensor(width) <= 0).any()):
            raise ValueError(f"bad image size {height}x{width}")
        cfg = self.cfg
        top, left, h, w = self._sample_crops(n, height, width, generator)

        def coin(p: float) -> Tensor:
            return _uniform(n, 0.0, 1.0, generator) < p

        def factor(x: float) -> Tensor:
            return _uniform(n, max(0.0, 1.0 - x), 1.0 + x, generator)

        flip = coin(cfg.hflip)
        jitter = coin(cfg.jitter_p)
        brightness = factor(cfg.brightness)
        contrast = factor(cfg.contrast)
        saturation = factor(cfg.saturation)
        hue = _uniform(n, -cfg.hue, cfg.hue, generator)
        gray = coin(cfg.gray_p)
        blur = coin(cfg.blur_p)
        sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], generator)
        return {
            "top": top.float(),
            "left": left.float(),
            "height": h.float(),
            "width": w.float(),
            "flip": flip,
            "jitter": jitter,
            "brightness": brightness,
            "contrast": contrast,
            "saturation": saturation,
            "hue": hue,
            "gray": gray,
            "blur": blur,
            "sigma": sigma,
        }

    # ------------------------------------------------------------------- apply
    def _crop_flip(self, x: Tensor, params: dict) -> Tensor:
        """Crop each box, resize it to (size, size) and optionally mirror it, in one grid_sample.

        Output pixel j samples the input at x = left + (j + 0.5) * w / size
        (in pixel-edge units), clamped to the centres of the box's outermost
        pixels: exactly the positions F.interpolate(..., mode="bilinear",
        align_corners=False) uses on the cropped slice, so a view never reads
        pixels outside its box. Note: bilinear grid_sample does not antialias,
        so strong downscaling aliases a little (torchvision's resized_crop
        antialiases by default); accepted for speed and simplicity.
        """
        b, _, height, width = x.shape
        size = self.cfg.size
        # Grid built in float64 next to the params (normally CPU), then moved.
        top = params["top"].to(torch.float64).view(-1, 1)
        left = params["left"].to(torch.float64).view(-1, 1)
        h = params["height"].to(torch.float64).view(-1, 1)
        w = params["width"].to(torch.float64).view(-1, 1)
        steps = (torch.arange(size, dtype=torch.float64, device=top.device) + 0.5).view(1, -1) / size
        px = torch.minimum(torch.maximum(left + steps * w, left + 0.5), left + w - 0.5)
        py = torch.minimum(torch.maximum(top + steps * h, top + 0.5), top + h - 0.5)
        flip = params["flip"].to(px.device).view(-1, 1)
        px = torch.where(flip, px.flip(1), px)
        # pixel-edge coordinates -> grid_sample's [-1, 1] (align_corners=False)
        gx = (px * (2.0 / width) - 1.0).to(device=x.device, dtype=torch.float32)
        gy = (py * (2.0 / height) - 1.0).to(device=x.device, dtype=torch.float32)
        grid = torch.stack(
            (gx.view(b, 1, size).expand(b, size, size), gy.view(b, size, 1).expand(b, size, size)), dim=-1
        )
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _jitter(self, x: Tensor, params: dict, device: torch.device) -> Tensor:
        """Colour jitter for images whose ``jitter`` flag is set.

        Fixed order brightness, contrast, saturation, hue (torchvision's
        ColorJitter shuffles the order per call; we do not). Images with the flag
        off get neutral factors, which are exact identities for the blends; the
        hue round trip is masked out with torch.where instead.
        """
        on = params["jitter"]
        view = (-1, 1, 1, 1)
        on_d = on.to(device).view(view)
        one = torch.ones((), device=device)

        def neutral_unless_on(key: str) -> Tensor:
            return torch.where(on_d, params[key].to(device=device, dtype=torch.float32).view(view), one)

        x = (x * neutral_unless_on("brightness")).clamp_(0.0, 1.0)
        mean_gray = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        x = _blend(x, mean_gray, neutral_unless_on("contrast"))
        x = _blend(x, _grayscale(x), neutral_unless_on("saturation"))
        hue = params["hue"]
        if bool((on & (hue != 0)).any()):  # decided on the params' device (CPU): no GPU sync
            shifted = _adjust_hue(x, hue.to(device=device, dtype=torch.float32))
            x = torch.where(on_d, shifted, x)
        return x

    def apply(self, images: Tensor, params: dict) -> Tensor:
        """Deterministic given ``params``. images: uint8 or float (B, 3, H, W) on any device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        if len(params["top"]) != images.shape[0]:
            raise ValueError("params were sampled for a different batch size")
        device = images.device
        x = _to_float(images)
        x = self._crop_flip(x, params)

        if bool(params["jitter"].any()):
            x = self._jitter(x, params, device)

        gray = params["gray"]
        if bool(gray.any()):
            g = _grayscale(x).expand_as(x)
            x = torch.where(gray.to(device).view(-1, 1, 1, 1), g, x)

        blur = params["blur"]
        if bool(blur.any()):
            sigma = params["sigma"].to(device=device, dtype=torch.float32)
            blurred = _gaussian_blur(x, sigma, self.kernel_size)
            x = torch.where(blur.to(device).view(-1, 1, 1, 1), blurred, x)

        return normalize(x, self.cfg.mean, self.cfg.std)

    def forward(self, images: Tensor, generator: Optional[torch.Generator], sizes: Optional[Tensor] = None) -> Tensor:
        """``sizes``: (B, 2) each image's own (height, width) when the batch pads images of several
        sizes into one canvas (top-left aligned): every crop is drawn over that image, all of it."""
        height, width = image_sizes(images, sizes)
        params = self.sample_params(len(images), height, width, generator)
        return self.apply(images, params)


def image_sizes(images: Tensor, sizes: Optional[Tensor]) -> tuple:
    """(heights, widths) of a batch for crop sampling: the canvas's ints, or (B,) tensors."""
    if sizes is None:
        return images.shape[-2], images.shape[-1]
    sizes = sizes.cpu()
    if sizes.shape != (len(images), 2):
        raise ValueError(f"sizes must be ({len(images)}, 2), got {tuple(sizes.shape)}")
    if bool((sizes[:, 0] > images.shape[-2]).any() or (sizes[:, 1] > images.shape[-1]).any()):
        raise ValueError(f"an image size in sizes is larger than the {tuple(images.shape[-2:])} canvas")
    return sizes[:, 0], sizes[:, 1]


def two_views(augment: BatchAugment, images: Tensor, generator: Optional[torch.Generator],
              sizes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Two independently augmented views of the same batch (drawn one after the other)."""
    return augment(images, generator, sizes), augment(images, generator, sizes)


def local_crop_size(img_size: int) -> int:
    """DINO's and SwAV's 96 px local crops at 224, scaled: 3/7 of the side, rounded up to 8
    (so ViT patch sizes 4 and 8 divide it)."""
    return max(8, math.ceil(img_size * 3 / 7 / 8) * 8)


def multi_crop(global_augment: BatchAugment, local_augment: BatchAugment | None, images: Tensor,
               generator: Optional[torch.Generator], n_global: int = 2, n_local: int = 0,
               sizes: Optional[Tensor] = None) -> list[Tensor]:
    """SwAV's multi-crop: ``n_global`` large views then ``n_local`` small ones, each (B, 3, s, s),
    drawn one after the other from ``generator`` (so the stream is the same on every device);
    every crop, local ones included, is drawn over the whole image (``sizes``: see BatchAugment)."""
    views = [global_augment(images, generator, sizes) for _ in range(n_global)]
    if n_local:
        if local_augment is None:
            raise ValueError("n_local > 0 needs a local_augment")
        views += [local_augment(images, generator, sizes) for _ in range(n_local)]
    return views
