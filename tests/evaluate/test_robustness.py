"""keel.evaluate.robustness: each shift against an independent implementation or its formula, more
severity moving pixels more, and the scores equal to the protocols computed by hand."""
from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from keel.config import FinetuneConfig, override
from keel.data.sources import build_dataset
from keel.evaluate.features import extract_features
from keel.evaluate.frozen import evaluate_frozen, make_eval_transform
from keel.evaluate.knn import knn_eval
from keel.evaluate.linear import accuracy_topk
from keel.evaluate.robustness import SEVERITY_PARAMS, SHIFTS, robustness, robustness_knn, shift
from keel.jobs.finetune import finetune
from keel.models.registry import create_model


@pytest.fixture(scope="module")
def digits32():
    return build_dataset("digits", "test", 32, labeled=True).images[:48]


def _mad(a, b) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.parametrize("kind", SHIFTS)
def test_severity_zero_is_identity_and_more_severity_moves_pixels_more(kind, digits32):
    assert torch.equal(shift(digits32, kind, 0, seed=1), digits32)
    out = [shift(digits32, kind, s, seed=1) for s in range(1, 6)]
    assert all(o.dtype == torch.uint8 and o.shape == digits32.shape for o in out)
    d = [_mad(o, digits32) for o in out]
    assert 0 < d[0] and all(a < b for a, b in zip(d, d[1:])), d   # strictly monotone on these images


def test_jpeg_is_a_libjpeg_round_trip_at_the_stated_quality(digits32):
    rgb = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:   # torchvision's own libjpeg binding, where this torchvision still has it
        from torchvision.io import decode_jpeg, encode_jpeg
    except ImportError:
        encode_jpeg = None
    for images in (digits32[:4], rgb):
        for severity, quality in enumerate(SEVERITY_PARAMS["jpeg"], start=1):
            ours = shift(images, "jpeg", severity)
            assert not torch.equal(ours, images)
            for img, got in zip(images, ours):
                buf = io.BytesIO()
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
                ref = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
                assert torch.equal(got, torch.from_numpy(ref).permute(2, 0, 1))
                if encode_jpeg is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        assert torch.equal(got, decode_jpeg(encode_jpeg(img, quality=quality)))


def test_noise_is_seeded_and_has_the_stated_std():
    grey = torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)      # no clipping around mid-grey
    a, b = shift(grey, "noise", 3, seed=5), shift(grey, "noise", 3, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, shift(grey, "noise", 3, seed=6))
    z = a.float() - 128
    assert z.mean().item() == pytest.approx(0.0, abs=0.3)
    assert z.std().item() == pytest.approx(0.08 * 255, rel=0.03)   # severity 3: std 0.08 of the range


def test_contrast_formula_by_hand():
    x = torch.tensor([0, 60, 120, 240], dtype=torch.uint8).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    out = shift(x, "contrast", 3)                  # factor 0.4 about the image mean 105
    expected = torch.tensor([105 - 0.4 * 105, 105 - 0.4 * 45, 105 + 0.4 * 15, 105 + 0.4 * 135]).round()
    assert out[0, 0].flatten().tolist() == expected.tolist() == [63.0, 87.0, 111.0, 159.0]


def test_blur_matches_torchvision_gaussian_blur():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    big = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for images, scale in ((x, 1.0), (big, 2.0)):       # sigma doubles at 64 px
        for severity, sigma in enumerate(SEVERITY_PARAMS["blur"], start=1):
            s = sigma * scale
            r = int(np.ceil(3 * s))
            ref = TF.gaussian_blur(images.float(), [2 * r + 1] * 2, [s, s]).round().clamp(0, 255)
            diff = (shift(images, "blur", severity).float() - ref).abs()
            assert diff.max() <= 1 and diff.mean() < 0.01     # equal up to a rounding at .5
    flat = torch.full((1, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(shift(flat, "blur", 5), flat)


def test_bad_arguments():
    x = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown shift"):
        shift(x, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        shift(x, "noise", 6)
    with pytest.raises(ValueError, match="uint8"):
        shift(x.float(), "noise", 1)


@pytest.fixture(scope="module")
def tuned():
    train = build_dataset("digits", "train", 8, labeled=True)
    test = build_dataset("digits", "test", 8, labeled=True)
    torch.manual_seed(0)
    backbone = create_model("resnet10_cifar")
    cfg = override(FinetuneConfig(), {
        "data.img_size": 8, "train.epochs": 2, "train.warmup_epochs": 0.5, "train.lr": 3e-2, "train.batch_size": 128,
        "train.eval_every": 0, "model.drop_path_rate": 0.0, "task.label_smoothing": 0.0, "train.device": "cpu",
        "data.num_workers": 0})
    res = finetune(copy.deepcopy(backbone), train, test, cfg, progress=False)
    return backbone, train, test, res


def test_classifier_robustness_equals_direct_computation(tuned):
    _, _, test, res = tuned
    clf = res["classifier"]
    out = robustness(clf, test, 8, severities=(2, 5), seed=3, batch_size=512)
    assert out["clean"] == pytest.approx(res["final"]["top1"])     # fine-tuning's own evaluation
    transform = make_eval_transform(8)
    clf.eval()                      # finetune returns its classifier as training left it (train mode)
    with torch.no_grad():
        for kind in SHIFTS:
            for sev in (2, 5):
                # one batch (360 test images < 512): its noise seed is seed + 0
                logits = clf(transform(shift(test.images, kind, sev, seed=3)))
                assert out[kind][sev] == pytest.approx(accuracy_topk(logits, test.labels, (1,))[1]), (kind, sev)
    shifted = [out[k][s] for k in SHIFTS for s in (2, 5)]
    assert out["mean_shifted"] == pytest.approx(np.mean(shifted))
    assert res["final"]["top1"] > 40 and out["contrast"][5] < out["clean"] - 5   # a real shift costs accuracy
    clf.train()                                                     # train/eval flags come back as they were
    robustness(clf, test, 8, shifts=("noise",), batch_size=512)
    assert clf.training and clf.head.training


def test_knn_robustness_clean_equals_evaluate_frozen(tuned):
    backbone, train, test, _ = tuned
    transform = make_eval_transform(8)
    feats = extract_features(backbone, train, transform)
    out = robustness_knn(backbone, test, 8, feats, shifts=("contrast", "jpeg"), severities=(3,), k=20)
    frozen = evaluate_frozen(backbone, train, test, 8, protocols=("knn",), ks=(20,))
    assert out["clean"] == pytest.approx(frozen["knn_top1@20"])
    for kind in ("contrast", "jpeg"):
        xte, yte = extract_features(backbone, test, lambda x, k=kind: transform(shift(x, k, 3)))
        direct = knn_eval(*feats, xte, yte, ks=(20,), num_classes=10)["knn_top1@20"]
        assert out[kind][3] == pytest.approx(direct)
    assert set(out) == {"clean", "contrast", "jpeg", "mean_shifted"}
