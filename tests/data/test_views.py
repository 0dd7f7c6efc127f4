"""Tests for keel.data.views, using torchvision's per-image ops as the reference implementation."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from keel.data.views import (
    BatchAugment,
    ViewConfig,
    blur_kernel_size,
    eval_transform,
    normalize,
    two_views,
)

# Normalisation that leaves [0, 1] values untouched, so outputs can be compared directly.
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def make_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=make_gen(seed))


def plain_params(n: int, h: int, w: int, **over) -> dict:
    """Params for an identity crop (full image), every op off, neutral factors."""
    p = {
        "top": torch.zeros(n),
        "left": torch.zeros(n),
        "height": torch.full((n,), float(h)),
        "width": torch.full((n,), float(w)),
        "flip": torch.zeros(n, dtype=torch.bool),
        "jitter": torch.zeros(n, dtype=torch.bool),
        "brightness": torch.ones(n),
        "contrast": torch.ones(n),
        "saturation": torch.ones(n),
        "hue": torch.zeros(n),
        "gray": torch.zeros(n, dtype=torch.bool),
        "blur": torch.zeros(n, dtype=torch.bool),
        "sigma": torch.ones(n),
    }
    p.update(over)
    return p


def mostly_on(n: int) -> torch.Tensor:
    """All flags on except the last image, to check that masking leaves it alone."""
    flags = torch.ones(n, dtype=torch.bool)
    flags[-1] = False
    return flags


N, S = 6, 24


# --------------------------------------------------------------------------- 1. per-image ops
@pytest.mark.parametrize(
    "key, low, high, ref",
    [
        ("brightness", 0.5, 1.5, TF.adjust_brightness),
        ("contrast", 0.5, 1.5, TF.adjust_contrast),
        ("saturation", 0.0, 2.0, TF.adjust_saturation),
    ],
)
def test_jitter_factor_matches_torchvision(key, low, high, ref):
    x = rand_images(N, S, S)
    factors = torch.rand(N, generator=make_gen(1)) * (high - low) + low
    jitter = mostly_on(N)
    aug = BatchAugment(ViewConfig(size=S, **RAW))
    out = aug.apply(x, plain_params(N, S, S, jitter=jitter, **{key: factors}))
    for i in range(N):
        expected = ref(x[i], float(factors[i])) if jitter[i] else x[i]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


def test_hue_matches_torchvision():
    x = rand_images(N, S, S)
    # include greys and saturated colours, where the HSV conversion has special cases
    x[0, :, :4] = 0.5
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    x[1, :, 4:8] = torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1)
    x[2, :, :4] = 0.0
    hue = torch.tensor([-0.5, -0.31, -0.05, 0.12, 0.5, 0.3])
    jitter = mostly_on(N)
    aug = BatchAugment(ViewConfig(size=S, **RAW))
    out = aug.apply(x, plain_params(N, S, S, jitter=jitter, hue=hue))
    for i in range(N):
        expected = TF.adjust_hue(x[i], float(hue[i])) if jitter[i] else x[i]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


def test_full_jitter_is_torchvision_sequence():
    x = rand_images(N, S, S, seed=3)
    g = make_gen(4)
    b, c, s = (torch.rand(N, generator=g) * 0.8 + 0.6 for _ in range(3))
    h = torch.rand(N, generator=g) * 0.2 - 0.1
    jitter = mostly_on(N)
    params = plain_params(N, S, S, jitter=jitter, brightness=b, contrast=c, saturation=s, hue=h)
    out = BatchAugment(ViewConfig(size=S, **RAW)).apply(x, params)
    for i in range(N):
        e = x[i]
        if jitter[i]:
            e = TF.adjust_brightness(e, float(b[i]))
            e = TF.adjust_contrast(e, float(c[i]))
            e = TF.adjust_saturation(e, float(s[i]))
            e = TF.adjust_hue(e, float(h[i]))
        torch.testing.assert_close(out[i], e, rtol=0, atol=1e-5)


def test_grayscale_matches_torchvision():
    x = rand_images(N, S, S)
    gray = mostly_on(N)
    out = BatchAugment(ViewConfig(size=S, **RAW)).apply(x, plain_params(N, S, S, gray=gray))
    for i in range(N):
        expected = TF.rgb_to_grayscale(x[i], num_output_channels=3) if gray[i] else x[i]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [24, 64])
def test_blur_matches_torchvision(size):
    x = rand_images(4, size, size)
    aug = BatchAugment(ViewConfig(size=size, **RAW))
    k = aug.kernel_size
    assert k == blur_kernel_size(size) and k % 2 == 1 and k >= 3
    assert k == (3 if size == 24 else 7)
    sigma = torch.tensor([0.1, 0.7, 2.0, 1.3])
    blur = mostly_on(4)
    out = aug.apply(x, plain_params(4, size, size, blur=blur, sigma=sigma))
    for i in range(4):
        expected = TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) if blur[i] else x[i]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


def test_hflip_matches_torchvision():
    x = rand_images(N, S, S)
    flip = mostly_on(N)
    out = BatchAugment(ViewConfig(size=S, **RAW)).apply(x, plain_params(N, S, S, flip=flip))
    for i in range(N):
        expected = TF.horizontal_flip(x[i]) if flip[i] else x[i]
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 2. crop
def test_identity_scale_crop_is_exact_slice():
    x = rand_images(3, 40, 28)
    size = 16
    tops, lefts = [5, 0, 24], [7, 12, 0]
    flip = torch.tensor([False, True, True])
    params = plain_params(
        3,
        size,
        size,
        top=torch.tensor(tops, dtype=torch.float32),
        left=torch.tensor(lefts, dtype=torch.float32),
        flip=flip,
    )
    out = BatchAugment(ViewConfig(size=size, **RAW)).apply(x, params)
    for i in range(3):
        expected = x[i, :, tops[i] : tops[i] + size, lefts[i] : lefts[i] + size]
        if flip[i]:
            expected = expected.flip(-1)
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)


def test_downscaled_crop_matches_resized_crop():
    size = 12
    boxes = [(4, 2, 24, 20), (0, 0, 40, 28), (10, 3, 17, 9)]  # (top, left, h, w); last one upsamples
    n = len(boxes)
    params = plain_params(
        n,
        size,
        size,
        top=torch.tensor([float(b[0]) for b in boxes]),
        left=torch.tensor([float(b[1]) for b in boxes]),
        height=torch.tensor([float(b[2]) for b in boxes]),
        width=torch.tensor([float(b[3]) for b in boxes]),
        flip=torch.tensor([False, True, False]),
    )
    aug = BatchAugment(ViewConfig(size=size, **RAW))

    # Arbitrary content: same bilinear sample positions as an un-antialiased resize of the slice.
    x = rand_images(n, 40, 28)
    out = aug.apply(x, params)
    for i, (t, l, h, w) in enumerate(boxes):
        ref = TF.resized_crop(x[i], t, l, h, w, [size, size], antialias=False)
        ref2 = F.interpolate(x[i : i + 1, :, t : t + h, l : l + w], size=(size, size), mode="bilinear")[0]
        if params["flip"][i]:
            ref, ref2 = ref.flip(-1), ref2.flip(-1)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(out[i], ref2, rtol=0, atol=1e-5)

    # Smooth content: close to torchvision's antialiased resized_crop as well.
    rows = torch.linspace(0, 1, 40).view(40, 1)
    cols = torch.linspace(0, 1, 28).view(1, 28)
    grad = torch.stack([0.6 * rows + 0.4 * cols, rows.expand(40, 28), (1 - cols).expand(40, 28)]).expand(n, 3, 40, 28).contiguous()
    out = aug.apply(grad, params)
    for i, (t, l, h, w) in enumerate(boxes):
        ref = TF.resized_crop(grad[i], t, l, h, w, [size, size], antialias=True)
        if params["flip"][i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=0.01)


# --------------------------------------------------------------------------- 3. independence, reproducibility
def test_per_image_independence_and_reproducibility():
    img = torch.randint(0, 256, (1, 3, 32, 32), generator=make_gen(0), dtype=torch.uint8)
    batch = img.expand(64, 3, 32, 32)
    aug = BatchAugment(ViewConfig(size=32, blur_p=0.5))
    out = aug(batch, make_gen(7))
    flat = out.flatten(1)
    dist = torch.cdist(flat, flat) + torch.eye(64) * 1e9
    assert dist.min() > 1e-3  # all 64 views differ
    torch.testing.assert_close(aug(batch, make_gen(7)), out, rtol=0, atol=0)
    assert not torch.allclose(aug(batch, make_gen(8)), out)

    v1, v2 = two_views(aug, batch, make_gen(9))
    assert v1.shape == v2.shape == (64, 3, 32, 32)
    assert not torch.allclose(v1, v2)
    w1, w2 = two_views(aug, batch, make_gen(9))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


# --------------------------------------------------------------------------- 4. parameter statistics
def test_parameter_statistics():
    n, h, w = 20_000, 48, 64
    cfg = ViewConfig(blur_p=0.5)
    p = BatchAugment(cfg).sample_params(n, h, w, make_gen(0))
    assert all(len(v) == n for v in p.values())
    for key, prob in [("flip", cfg.hflip), ("gray", cfg.gray_p), ("jitter", cfg.jitter_p), ("blur", cfg.blur_p)]:
        assert p[key].dtype == torch.bool
        assert abs(p[key].float().mean().item() - prob) < 0.02, key
    for key in ["brightness", "contrast", "saturation"]:
        x = getattr(cfg, key)
        assert p[key].min() >= 1 - x and p[key].max() <= 1 + x
        assert abs(p[key].mean().item() - 1.0) < 0.01
    assert p["hue"].abs().max() <= cfg.hue and p["hue"].min() < -0.09 and p["hue"].max() > 0.09
    assert p["sigma"].min() >= cfg.blur_sigma[0] and p["sigma"].max() <= cfg.blur_sigma[1]

    top, left, ch, cw = p["top"], p["left"], p["height"], p["width"]
    for t in (top, left, ch, cw):
        assert torch.equal(t, t.round())  # integer boxes, like torchvision
    assert top.min() >= 0 and left.min() >= 0 and ch.min() >= 1 and cw.min() >= 1
    assert (top + ch).max() <= h and (left + cw).max() <= w
    area = ch * cw
    slack = 0.5 * (ch + cw) + 0.25  # rounding h and w to integers moves the area this much at most
    assert (area >= cfg.scale[0] * h * w - slack).all() and (area <= cfg.scale[1] * h * w + slack).all()
    frac = area / (h * w)

    torch.manual_seed(0)
    ref = torch.tensor(
        [RandomResizedCrop.get_params(torch.empty(3, h, w), list(cfg.scale), list(cfg.ratio)) for _ in range(n)],
        dtype=torch.float32,
    )
    ref_frac = ref[:, 2] * ref[:, 3] / (h * w)
    assert abs(frac.mean().item() - ref_frac.mean().item()) < 0.02
    assert abs((cw / ch).log().mean().item() - (ref[:, 3] / ref[:, 2]).log().mean().item()) < 0.02
    # offsets: uniform over the free range
    room = ch < h
    assert abs((top[room] / (h - ch[room])).mean().item() - 0.5) < 0.02
    room = cw < w
    assert abs((left[room] / (w - cw[room])).mean().item() - 0.5) < 0.02


def test_crop_fallback_matches_torchvision():
    # Wide image with a large minimum area: no candidate fits, torchvision falls back to a centre crop.
    h, w = 20, 64
    cfg = ViewConfig(scale=(0.9, 1.0))
    p = BatchAugment(cfg).sample_params(100, h, w, make_gen(0))
    torch.manual_seed(0)
    ti, tj, th, tw = RandomResizedCrop.get_params(torch.empty(3, h, w), list(cfg.scale), list(cfg.ratio))
    assert (ti, tj, th, tw) == (0, 18, 20, 27)
    for key, val in zip(["top", "left", "height", "width"], [ti, tj, th, tw]):
        assert (p[key] == val).all(), key


# --------------------------------------------------------------------------- 5. output and normalisation
OFF = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


def test_all_white_with_ops_off_gives_exact_normalised_value():
    x = torch.full((5, 3, 32, 32), 255, dtype=torch.uint8)
    out = BatchAugment(ViewConfig(size=32, mean=MEAN, std=STD, **OFF))(x, make_gen(0))
    assert out.dtype == torch.float32 and out.shape == (5, 3, 32, 32)
    expected = (1.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.equal(out, expected.view(1, 3, 1, 1).expand_as(out))


def test_default_output_shape_dtype_and_range():
    x = torch.randint(0, 256, (8, 3, 40, 28), generator=make_gen(0), dtype=torch.uint8)
    out = BatchAugment(ViewConfig(size=20, blur_p=0.5))(x, make_gen(1))
    assert out.dtype == torch.float32 and out.shape == (8, 3, 20, 20)
    assert torch.isfinite(out).all()
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6  # mean = std = 0.5 maps [0, 1] to [-1, 1]


def test_normalize_and_eval_transform():
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=make_gen(0), dtype=torch.uint8)
    xf = x.float() / 255
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x, MEAN, STD), (xf - m) / s)
    torch.testing.assert_close(normalize(xf, MEAN, STD), (xf - m) / s)
    torch.testing.assert_close(normalize(x[0], MEAN, STD), ((xf - m) / s)[0])
    torch.testing.assert_close(eval_transform(x, 32, MEAN, STD), (xf - m) / s)
    small = eval_transform(x, 16, MEAN, STD)
    assert small.shape == (4, 3, 16, 16) and small.dtype == torch.float32
    ref = TF.resize(xf, [16, 16], antialias=True)
    torch.testing.assert_close(small, (ref - m) / s, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 6. input kinds
def test_uint8_and_float_inputs_agree():
    x = torch.randint(0, 256, (4, 3, 40, 28), generator=make_gen(0), dtype=torch.uint8)
    aug = BatchAugment(ViewConfig(size=16, blur_p=0.5))
    params = aug.sample_params(4, 40, 28, make_gen(1))
    a = aug.apply(x, params)
    b = aug.apply(x.float() / 255, params)
    c = aug.apply(x.double() / 255, params)
    assert a.shape == (4, 3, 16, 16) and a.dtype == b.dtype == c.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def test_batch_of_one_and_non_square():
    x = torch.randint(0, 256, (1, 3, 40, 28), generator=make_gen(0), dtype=torch.uint8)
    aug = BatchAugment(ViewConfig(size=32, blur_p=1.0, jitter_p=1.0, gray_p=0.5))
    out = aug(x, make_gen(2))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    # the single image equals the same image processed inside a larger batch with the same params
    big = torch.cat([x, torch.zeros_like(x)])
    params = aug.sample_params(1, 40, 28, make_gen(2))
    params2 = {k: torch.cat([v, v]) for k, v in params.items()}
    torch.testing.assert_close(aug.apply(big, params2)[:1], out, rtol=0, atol=1e-6)


def test_rejects_bad_input():
    aug = BatchAugment(ViewConfig())
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), make_gen(0))
    with pytest.raises(TypeError):
        aug(torch.zeros(2, 3, 32, 32, dtype=torch.int64), make_gen(0))


# --------------------------------------------------------------------------- device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randint(0, 256, (16, 3, 40, 28), generator=make_gen(0), dtype=torch.uint8)
    aug = BatchAugment(ViewConfig(size=24, blur_p=0.5))
    cpu = aug(x, make_gen(3))
    gpu = aug(x.cuda(), make_gen(3))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)
    params = {k: v.cuda() for k, v in aug.sample_params(16, 40, 28, make_gen(3)).items()}
    torch.testing.assert_close(aug.apply(x.cuda(), params).cpu(), cpu, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- 6. images of their own sizes
def test_crops_over_a_padded_canvas_stay_inside_each_image():
    """Whole images of several sizes share a zero-padded canvas: every crop box lies in its own
    image, covers the scale range of *that* image's area, and no view ever sees the padding."""
    sizes = torch.tensor([[20, 40], [40, 20], [30, 30], [12, 50]] * 50)
    aug = BatchAugment(ViewConfig(size=16, jitter_p=0.0, gray_p=0.0, blur_p=0.0))
    p = aug.sample_params(len(sizes), sizes[:, 0], sizes[:, 1], make_gen(0))
    h, w = sizes[:, 0].double(), sizes[:, 1].double()
    assert (p["top"] >= 0).all() and (p["left"] >= 0).all()
    assert (p["top"] + p["height"] <= h).all() and (p["left"] + p["width"] <= w).all()
    frac = p["height"].double() * p["width"].double() / (h * w)
    assert frac.min() >= 0.19 and frac.max() <= 1.0
    # each image's area fractions follow torchvision's RandomResizedCrop for its own size
    many = torch.tensor([[20, 40], [30, 30]]).repeat(1000, 1)
    q = aug.sample_params(len(many), many[:, 0], many[:, 1], make_gen(2))
    torch.manual_seed(0)
    for k, (hh, ww) in enumerate([(20, 40), (30, 30)]):
        ours = (q["height"][k::2] * q["width"][k::2]).double().mean() / (hh * ww)
        ref = torch.tensor([float(np.prod(RandomResizedCrop.get_params(torch.empty(3, hh, ww), [0.2, 1.0],
                                                                        [3 / 4, 4 / 3])[2:])) for _ in range(1000)])
        assert abs(ours - ref.mean() / (hh * ww)) < 0.03
    canvas = torch.full((len(sizes), 3, 40, 50), 255, dtype=torch.uint8)
    for k, (hh, ww) in enumerate(sizes.tolist()):
        canvas[k, :, :hh, :ww] = 0                                   # image black, padding white
    views = aug(canvas, make_gen(1), sizes)
    assert torch.equal(views, torch.full_like(views, -1.0))        # (0 - 0.5) / 0.5 everywhere


def test_sizes_equal_to_the_canvas_change_nothing():
    x = torch.randint(0, 256, (6, 3, 24, 24), generator=make_gen(0), dtype=torch.uint8)
    aug = BatchAugment(ViewConfig(size=16))
    same = aug(x, make_gen(3), torch.tensor([[24, 24]] * 6))
    assert torch.equal(same, aug(x, make_gen(3)))


def test_per_image_fallback_matches_torchvision():
    # no candidate fits a 20x64 image at scale >= 0.9: torchvision's centre-crop fallback, per image
    cfg = ViewConfig(scale=(0.9, 1.0))
    sizes = torch.tensor([[20, 64], [64, 20]])
    p = BatchAugment(cfg).sample_params(2, sizes[:, 0], sizes[:, 1], make_gen(0))
    for k, (h, w) in enumerate(sizes.tolist()):
        torch.manual_seed(0)
        want = RandomResizedCrop.get_params(torch.empty(3, h, w), list(cfg.scale), list(cfg.ratio))
        assert tuple(int(p[key][k]) for key in ("top", "left", "height", "width")) == want


def test_bad_sizes_are_refused():
    x = torch.zeros(2, 3, 10, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="canvas"):
        BatchAugment(ViewConfig(size=8))(x, make_gen(0), torch.tensor([[10, 10], [11, 10]]))
