"""keel.data.recipes: RandAugment (timm's spec and level scale on torchvision's operations),
random erasing, Mixup/CutMix pixels and targets by hand, soft-target cross-entropy with label
smoothing, repeated augmentation, and the whole view pipeline."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from keel.data.recipes import (MixupCutmix, RandAugment, RandAugmentSpec, RandomErasing, RecipeAugment,
                               parse_randaugment, repeated_batches)
from keel.data.views import BatchAugment, ViewConfig
from keel.tasks.classify import ClassificationTask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_parse_randaugment_reads_timm_specs():
    assert parse_randaugment("rand-m9-mstd0.5-inc1") == RandAugmentSpec(
        num_ops=2, magnitude=9.0, magnitude_std=0.5, magnitude_max=10.0, prob=0.5, increasing=True)
    assert parse_randaugment("rand-n3-m7-p1-mmax8-inc0") == RandAugmentSpec(
        num_ops=3, magnitude=7.0, magnitude_std=0.0, magnitude_max=8.0, prob=1.0, increasing=False)
    for bad in ("augmix-m5", "rand-m9-w0", "rand-m11", "rand-mx", "rand-p2"):
        with pytest.raises(ValueError):
            parse_randaugment(bad)


def test_randaugment_levels_follow_timm_noise_and_coin():
    ra = RandAugment("rand-m9-mstd0.5-mmax9.5-p0.3")
    applied, level = ra.levels(20000, gen(0))
    assert applied.shape == level.shape == (20000, 2)
    assert applied.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert level.max().item() == 9.5 and level.min().item() >= 0.0          # clipped at mmax
    # N(9, 0.5) clipped at 9.5: the mean of the clipped normal is 9 - 0.5 * pdf(1) - ... by formula
    z = 1.0                                                                  # (9.5 - 9) / 0.5
    pdf, cdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(z / math.sqrt(2)))
    expected = 9.0 * cdf - 0.5 * pdf + 9.5 * (1 - cdf)
    assert level.mean().item() == pytest.approx(expected, abs=0.01)
    assert (level == 9.5).float().mean().item() == pytest.approx(1 - cdf, abs=0.01)


def test_randaugment_is_torchvisions_at_timms_level_scale():
    """One operation, always applied, no noise: level 9 of 10 is torchvision's RandAugment with
    11 magnitude bins at bin 9 (9/10 of each operation's maximum), drawn from the same stream."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import RandAugment as TV
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=gen(1))
    ra = RandAugment("rand-n1-m9-p1", fill=(128, 128, 128))
    ours = ra(images, gen(5))
    tv = TV(num_ops=1, magnitude=9, num_magnitude_bins=11, interpolation=InterpolationMode.BILINEAR,
            fill=[128, 128, 128])
    g = gen(5)
    torch.rand(12, 1, generator=g)                            # the per-operation coins
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))  # then the seed of torchvision's draws
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        want = torch.stack([tv(img) for img in images])
    assert torch.equal(ours, want)
    assert ours.dtype == torch.uint8 and not torch.equal(ours, images)


def test_randaugment_is_per_image_and_reproducible():
    same = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=gen(2)).expand(16, -1, -1, -1)
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    a, b, c = ra(same, gen(3)), ra(same, gen(3)), ra(same, gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    distinct = {tuple(img.flatten().tolist()) for img in a}
    assert len(distinct) > 8                                  # each image drew its own operations
    assert torch.equal(RandAugment("rand-m9-p0")(same, gen(3)), same)   # no operation applied


def test_random_erasing_hits_about_p_of_the_images_with_one_box():
    x = torch.randn(400, 3, 16, 16, generator=gen(0))
    out = RandomErasing(0.25)(x, gen(1))
    changed = (out != x).flatten(1).any(1)
    assert 70 <= int(changed.sum()) <= 130                    # Binomial(400, 0.25): 100 +- 3.5 sd
    for i in changed.nonzero().flatten().tolist():
        diff = (out[i] != x[i]).any(0)                        # (H, W) erased pixels
        rows, cols = diff.any(1).nonzero().flatten(), diff.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(diff.sum()) == h * w                       # one rectangle
        assert 0.02 * 256 - 2 <= h * w <= 256 / 3 + 4         # area 2% .. 1/3 (rounded sides)
    assert torch.equal(out[~changed], x[~changed])


def test_mixup_targets_and_pixels_match_lambda():
    B, C = 6, 4
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 8, 8).contiguous()
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    xm, t = MixupCutmix(C, mixup=0.8)(x, y, gen(0))
    assert t.shape == (B, C) and torch.all(t >= 0) and torch.allclose(t.sum(1), torch.ones(B))
    lam = t[0, y[0]].item()                                   # image 0 is mixed with image B-1
    assert 0 < lam < 1
    prev = torch.roll(torch.arange(B), 1)
    for i in range(B):
        want = torch.zeros(C)
        want[y[i]] += lam
        want[y[prev[i]]] += 1 - lam
        torch.testing.assert_close(t[i], want)
        torch.testing.assert_close(xm[i], torch.full((3, 8, 8), lam * i + (1 - lam) * float(prev[i])))


def test_cutmix_box_pixels_and_corrected_lambda_by_hand():
    B, C, H, W = 5, 5, 12, 10
    x = (torch.arange(B, dtype=torch.float32) + 1).view(B, 1, 1, 1).expand(B, 3, H, W).contiguous()
    y = torch.arange(B)
    prev = torch.roll(torch.arange(B), 1)
    for seed in range(6):
        xm, t = MixupCutmix(C, cutmix=1.0)(x, y, gen(seed))
        pasted = xm[0, 0] != x[0, 0]                          # where image 0 shows its neighbour
        if pasted.any():
            rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
            y1, y2, x1, x2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        else:
            y1 = y2 = x1 = x2 = 0
        lam = 1 - (y2 - y1) * (x2 - x1) / (H * W)             # the box's share, clipped at the border
        for i in range(B):
            want = x[i].clone()
            want[:, y1:y2, x1:x2] = float(prev[i] + 1)        # same box in every image
            assert torch.equal(xm[i], want)
            torch.testing.assert_close(t[i], lam * F.one_hot(y[i], C) + (1 - lam) * F.one_hot(y[prev[i]], C).float())


def test_switch_prob_picks_cutmix_that_often():
    x = torch.rand(4, 3, 4, 4, generator=gen(0))
    mix = MixupCutmix(3, mixup=0.8, cutmix=1.0, switch_prob=0.25)
    g, cut = gen(1), 0
    for _ in range(400):
        xm, _ = mix(x, torch.tensor([0, 1, 2, 0]), g)
        # CutMix copies pixels (each equals the image's own or its neighbour's), Mixup blends them
        cut += bool(((xm == x) | (xm == x.roll(1, 0))).all())
    assert 70 <= cut <= 130                                    # Binomial(400, 0.25): 100 +- 8.7


def test_soft_target_cross_entropy_with_smoothing_matches_the_hand_formula_and_timm():
    C, eps = 5, 0.1
    g = gen(0)
    logits = torch.randn(6, C, generator=g)
    y = torch.tensor([0, 3, 4, 1, 1, 2])
    lam = 0.7
    soft = lam * F.one_hot(y, C).float() + (1 - lam) * F.one_hot(y.flip(0), C).float()
    loss = ClassificationTask(C, label_smoothing=eps).loss(logits, soft)
    smoothed = soft * (1 - eps) + eps / C                      # smoothing folded into the targets
    hand = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, hand)
    timm_mixup = pytest.importorskip("timm.data.mixup")
    timm_loss = pytest.importorskip("timm.loss")
    target = timm_mixup.mixup_target(y, C, lam=lam, smoothing=eps)   # timm pairs i with B-1-i too
    torch.testing.assert_close(loss, timm_loss.SoftTargetCrossEntropy()(logits, target))


def test_repeated_batches_hold_each_image_repeats_times():
    n, steps, r = 50, 4, 3
    batches = repeated_batches(n, steps, r, gen(0))
    assert len(batches) == steps
    seen = torch.cat(batches)
    assert len(seen) == math.ceil(n / r) * r                   # ~ n samples per epoch, 17 distinct images
    for b in batches:
        _, counts = b.unique(return_counts=True)
        assert torch.all(counts == r)
        assert not torch.equal(b, b.view(-1, r)[:, :1].expand(-1, r).reshape(-1))  # copies shuffled apart
    assert len(seen.unique()) == math.ceil(n / r)              # no image in two batches
    plain = repeated_batches(n, steps, 1, gen(0))
    assert torch.equal(torch.cat(plain).sort().values, torch.arange(n))

    # each copy gets its own views
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen(1))
    aug = RecipeAugment(ViewConfig(size=16, scale=(0.35, 1.0)), "rand-m9-mstd0.5-inc1", reprob=0.25)
    b = batches[0]
    views = aug(images[b], gen(2))
    for idx in b.unique():
        copies = views[b == idx]
        assert len(copies) == r
        assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])


def test_recipe_augment_without_randaugment_is_keels_crop_and_normalisation():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen(0))
    view = ViewConfig(size=12, scale=(0.35, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    torch.testing.assert_close(RecipeAugment(view)(images, gen(1)), BatchAugment(view)(images, gen(1)))
    out = RecipeAugment(view, "rand-m9-mstd0.5-inc1", reprob=0.25)(images, gen(1))
    assert out.shape == (8, 3, 12, 12) and out.dtype == torch.float32
    kept = RecipeAugment(view, "rand-m9-mstd0.5-inc1")(images, gen(1))   # no erasing: uint8 levels, normalised
    assert kept.min() >= -1 and kept.max() <= 1
    torch.testing.assert_close((kept + 1) * 255 / 2, ((kept + 1) * 255 / 2).round(), atol=1e-4, rtol=0)
    # reproducible from the generator alone
    again = RecipeAugment(view, "rand-m9-mstd0.5-inc1", reprob=0.25)(images, gen(1))
    assert torch.equal(out, again)
