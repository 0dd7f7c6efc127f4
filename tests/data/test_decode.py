"""Training's decode: the whole image, aspect kept, read once, at a reduced size when it is large,
and every bad file still rejected."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from keel.data.decode import MAX_ASPECT, decode_whole, fit_side, load_image, train_side, _pil_to_tensor
from keel.data.errors import BadImageError
from keel.data.folders import ImageFolder, collate_skip

from tests.data.test_sources import BAD_WRITERS, GOOD_WRITERS


def _smooth(h, w, seed=0):
    """A smooth photo-like image: JPEG at quality 95 keeps it within a few levels."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(2, 6, 3)
    arr = np.stack([np.sin(a * x + 1), np.cos(b * y), np.sin(c * (x + y))], -1) * 100 + 128
    return arr.clip(0, 255).astype(np.uint8)


def _jpeg(path, arr, **kw):
    Image.fromarray(arr).save(path, "JPEG", quality=95, **kw)
    return path


def test_train_side_and_fitted_sizes():
    assert train_side(224) == 256 and train_side(32) == 37 and train_side(8) == 9
    image = torch.zeros(3, 768, 1024, dtype=torch.uint8)
    assert fit_side(image, 256).shape == (3, 256, 341)                    # aspect kept
    assert fit_side(torch.zeros(3, 20, 30, dtype=torch.uint8), 40).shape == (3, 40, 60)     # small ones enlarged
    panorama = fit_side(torch.zeros(3, 300, 3000, dtype=torch.uint8), 100)
    assert panorama.shape == (3, 20, 200) and max(panorama.shape[1:]) == MAX_ASPECT * 100


def test_large_jpeg_reduced_decode_matches_a_full_decode_then_resize(tmp_path):
    arr = _smooth(768, 1024)
    path = _jpeg(tmp_path / "big.jpg", arr)
    got = decode_whole(path, 256)                          # draft: libjpeg decodes at 1/2 scale
    assert got.shape == (3, 256, 341)
    ref = _pil_to_tensor(load_image(path).resize((341, 256), Image.Resampling.BILINEAR, reducing_gap=None))
    assert (got.float() - ref.float()).abs().mean() < 2.0  # the same picture (mean error under 2 levels)


def test_small_jpeg_goes_through_libjpeg_turbo_and_equals_pillow(tmp_path):
    arr = _smooth(60, 90)
    path = _jpeg(tmp_path / "small.jpg", arr)
    got = decode_whole(path, 60)                           # its own side: decoded, not resized
    assert torch.equal(got, _pil_to_tensor(load_image(path)))


def test_exif_orientation_is_applied_on_both_paths(tmp_path):
    arr = _smooth(600, 1000)
    arr[:200, :200] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6                                       # display rotated 90 degrees clockwise
    for side in (100, 400):                                # draft path, then the libjpeg-turbo path
        path = _jpeg(tmp_path / f"rot{side}.jpg", arr, exif=exif.tobytes())
        got = decode_whole(path, side)
        assert got.shape[1] > got.shape[2]                 # portrait once oriented
        ref = _pil_to_tensor(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        corner = ref[:, :10, -10:].float().mean((1, 2))    # the red block is now top-right
        assert corner[0] > 200 and got[:, :5, -5:].float().mean((1, 2))[0] > 200


@pytest.mark.parametrize("name", sorted(BAD_WRITERS))
def test_every_bad_file_kind_is_still_rejected(tmp_path, name):
    path = tmp_path / name
    BAD_WRITERS[name](path)
    with pytest.raises(BadImageError):
        decode_whole(path, 16)


def test_a_big_corrupt_jpeg_is_rejected_on_the_draft_path(tmp_path):
    good = tmp_path / "g.jpg"
    _jpeg(good, _smooth(400, 400))
    data = good.read_bytes()
    cut = data[: data.find(b"\xff\xda") + 2000]
    (tmp_path / "cut.jpg").write_bytes(cut)
    with pytest.raises(BadImageError, match="cannot decode image"):
        decode_whole(tmp_path / "cut.jpg", 32)       # 400 px >= 2 x 32: the reduced-size decode


def test_whole_folder_batches_pad_a_canvas_and_skip_bad_files(tmp_path):
    for name, write in {**GOOD_WRITERS, **BAD_WRITERS}.items():
        write(tmp_path / name)
    ds = ImageFolder(tmp_path, img_size=16, whole=True)
    batch = collate_skip([ds[i] for i in range(len(ds))])
    assert len(batch["skipped"]) == len(BAD_WRITERS)
    assert sorted(ds.paths[i].rsplit("/", 1)[1] for i in batch["skipped"]) == sorted(BAD_WRITERS)
    sizes = batch["sizes"]
    assert len(sizes) == len(GOOD_WRITERS) and len({tuple(s) for s in sizes.tolist()}) > 1
    for k, i in enumerate(batch["index"].tolist()):
        own = decode_whole(ds.paths[i], train_side(16))
        h, w = sizes[k].tolist()
        assert (h, w) == tuple(own.shape[1:]) and torch.equal(batch["images"][k, :, :h, :w], own)
        assert min(h, w) == train_side(16) or max(h, w) == 2 * train_side(16)   # the aspect cap
