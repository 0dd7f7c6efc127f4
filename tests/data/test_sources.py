"""Tests for keel.data.sources: decoding odd files, folders, built-ins, errors."""

from __future__ import annotations

import gzip
import io
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from keel.data import sources as S
from keel.data.sources import (
    BadImageError,
    DataError,
    ImageFolder,
    InMemoryImages,
    build_dataset,
    builtin_names,
    collate_skip,
    labeled_splits,
    load_image,
)


# ----------------------------------------------------------------------------
# helpers that write odd image files
# ----------------------------------------------------------------------------


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_good_rgb_jpeg(path):
    path.write_bytes(_jpeg_bytes(np.full((24, 32, 3), (200, 30, 40), dtype=np.uint8)))


def write_corrupt_jpeg(path):
    data = _jpeg_bytes(_noise(64, 64, 1))
    start_of_scan = data.find(b"\xff\xda")
    assert start_of_scan > 0
    garbage = np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    path.write_bytes(data[: start_of_scan + 20] + garbage)


def write_truncated_png(path):
    data = _png_bytes(_noise(64, 64, 3))
    path.write_bytes(data[: len(data) // 2])


def write_cmyk_jpeg(path):
    # CMYK (0, 255, 255, 0) is pure red
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, "JPEG", quality=95)


def write_16bit_png(path):
    ramp = np.linspace(1000, 40000, 64).astype(np.uint16)
    arr = np.tile(ramp, (8, 1))  # (8, 64): values grow left to right
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    im.save(path, "PNG")


def write_exif_rotated_jpeg(path):
    # stored 40 wide x 20 high, blue with a red 8x8 block in the top-left corner
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :] = (0, 0, 255)
    arr[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(path, "JPEG", quality=95, exif=exif.tobytes())


def write_palette_png_transparent(path):
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    for x in range(5, 10):
        for y in range(10):
            im.putpixel((x, y), 1)  # right half red, left half index 0 = transparent
    im.save(path, "PNG", transparency=0)


def write_rgba_png(path):
    arr = np.zeros((10, 10, 4), dtype=np.uint8)
    arr[:, :5] = (0, 0, 0, 0)  # left half fully transparent black
    arr[:, 5:] = (0, 200, 0, 255)  # right half opaque green
    Image.fromarray(arr, "RGBA").save(path, "PNG")


GOOD_WRITERS = {
    "good.jpg": write_good_rgb_jpeg,
    "cmyk.jpg": write_cmyk_jpeg,
    "deep16.png": write_16bit_png,
    "rotated.jpg": write_exif_rotated_jpeg,
    "palette.png": write_palette_png_transparent,
    "rgba.png": write_rgba_png,
}
def test_corrupt_jpeg_garbage_is_always_bad(tmp_path):
    # Whatever the garbage, a JPEG with a valid header and junk scan data is rejected
    # (libjpeg alone accepts some of these, filling the image with grey).
    data = _jpeg_bytes(_noise(64, 64, 1))
    start_of_scan = data.find(b"\xff\xda")
    for seed in range(12):
        garbage = np.random.default_rng(seed).integers(0, 256, 3000, dtype=np.uint8).tobytes()
        garbage = garbage.replace(b"\xff\xd9", b"\xff\x00")
        path = tmp_path / f"corrupt{seed}.jpg"
        path.write_bytes(data[: start_of_scan + 20] + garbage)
        with pytest.raises(BadImageError):
            load_image(path)


BAD_WRITERS = {
    "corrupt.jpg": write_corrupt_jpeg,
    "truncated.png": write_truncated_png,
    "empty.jpg": lambda p: p.write_bytes(b""),
    "text.jpg": lambda p: p.write_text("this is not an image\n"),
}


@pytest.fixture
def odd_folder(tmp_path):
    root = tmp_path / "odd"
    root.mkdir()
    for name, write in {**GOOD_WRITERS, **BAD_WRITERS}.items():
        write(root / name)
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    return root


# ----------------------------------------------------------------------------
# 1. a folder of bad and odd files through a DataLoader
# ----------------------------------------------------------------------------


def test_odd_folder_through_dataloader_skips_exactly_the_bad_files(odd_folder):
    ds = build_dataset(str(odd_folder), img_size=16)
    assert isinstance(ds, ImageFolder)
    assert len(ds) == len(GOOD_WRITERS) + len(BAD_WRITERS)  # notes.txt not counted
    assert not any(p.endswith(".txt") for p in ds.paths)
    assert ds.paths == sorted(ds.paths)
    assert (ds.labels == -1).all()

    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_skip)
    good_index, skipped, empty_batches = [], [], 0
    for batch in loader:
        images = batch["images"]
        assert images.dtype == torch.uint8
        if images.shape[0]:
            assert images.shape[1:] == (3, 16, 16)
        else:  # the last batch (text.jpg, truncated.png) is all bad: size unknown
            assert images.shape == (0, 3, 1, 1)
            empty_batches += 1
        assert batch["labels"].dtype == torch.int64 and batch["index"].dtype == torch.int64
        assert batch["skipped"].dtype == torch.int64
        assert len(batch["labels"]) == len(batch["index"]) == images.shape[0]
        good_index += batch["index"].tolist()
        skipped += batch["skipped"].tolist()

    assert len(skipped) == 4 and empty_batches == 1
    assert sorted(os.path.basename(ds.paths[i]) for i in skipped) == sorted(BAD_WRITERS)
    assert sorted(os.path.basename(ds.paths[i]) for i in good_index) == sorted(GOOD_WRITERS)


def test_odd_images_decode_to_the_right_rgb(odd_folder):
    good = load_image(odd_folder / "good.jpg")
    assert good.mode == "RGB" and good.size == (32, 24)
    assert np.abs(np.asarray(good)[12, 16].astype(int) - (200, 30, 40)).max() < 12

    cmyk = np.asarray(load_image(odd_folder / "cmyk.jpg")).astype(int)
    assert cmyk.shape == (16, 16, 3)
    r, g, b = cmyk[8, 8]
    assert r > 200 and g < 50 and b < 50  # red, not inverted

    deep = np.asarray(load_image(odd_folder / "deep16.png"))
    assert deep.dtype == np.uint8 and deep.shape == (8, 64, 3)
    assert deep.min() == 0 and deep.max() == 255  # stretched over its real range, not all white
    row = deep[3, :, 0].astype(int)
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 50  # keeps the gradient

    rot = load_image(odd_folder / "rotated.jpg")
    assert rot.size == (20, 40)  # (width, height): the 40x20 stored image turned upright
    px = np.asarray(rot).astype(int)
    # Orientation 6: the stored top-left corner is displayed at the top-right.
    assert px[3, 16, 0] > 200 and px[3, 16, 2] < 60
    assert px[3, 3, 0] < 60 and px[3, 3, 2] > 200
    assert px[36, 16, 0] < 60

    pal = np.asarray(load_image(odd_folder / "palette.png"))
    assert (pal[:, :5] == 255).all()  # transparent -> white
    assert (pal[:, 5:] == (255, 0, 0)).all()

    rgba = np.asarray(load_image(odd_folder / "rgba.png"))
    assert (rgba[:, :5] == 255).all()  # transparent black composited on white
    assert (rgba[:, 5:] == (0, 200, 0)).all()


@pytest.mark.parametrize(
    "mode, make",
    [
        ("L", lambda: Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)),
        ("1", lambda: Image.fromarray(np.eye(8, dtype=bool))),
        ("LA", lambda: Image.fromarray(np.dstack([np.full((8, 8), 0, np.uint8), np.tile([0, 255], (8, 4)).astype(np.uint8)]), "LA")),
        ("I", lambda: Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 100000 - 3000000)),
        ("F", lambda: Image.fromarray(np.linspace(-1.5, 2.5, 64, dtype=np.float32).reshape(8, 8))),
        ("YCbCr", lambda: Image.new("YCbCr", (8, 8), (81, 90, 240))),
        ("LAB", lambda: Image.new("LAB", (8, 8), (140, 200, 128))),
    ],
)
def test_other_modes_become_rgb_uint8(tmp_path, mode, make):
    im = make()
    assert im.mode == mode
    path = tmp_path / f"img_{mode}.tif"
    im.save(path, "TIFF")
    out = load_image(path)
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr.shape == (8, 8, 3) and arr.dtype == np.uint8
    if mode in ("I", "F", "L", "1"):
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # grey stays grey
    if mode == "L":
        assert (arr[..., 0] == np.asarray(im)).all()  # 8-bit grey is kept as is, not stretched
    if mode in ("I", "F", "1"):
        assert arr.min() == 0 and arr.max() == 255  # stretched over the image's own range
        if mode != "1":
            assert (np.diff(arr[..., 0].ravel().astype(int)) >= 0).all()  # ramp order kept
    if mode == "LA":
        assert (arr[:, 0::2] == 255).all() and (arr[:, 1::2] == 0).all()
    if mode == "YCbCr":
        assert arr[0, 0, 0] > 200 and arr[0, 0, 1] < 40  # (81, 90, 240) is red
    if mode == "LAB":
        assert arr[0, 0, 0] > arr[0, 0, 1] + 100  # strong positive a*: red-magenta


# ----------------------------------------------------------------------------
# 2. load_image raises BadImageError on each bad file
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_WRITERS))
def test_load_image_raises_bad_image_error(odd_folder, name):
    with pytest.raises(BadImageError) as info:
        load_image(odd_folder / name)
    assert name in str(info.value)
    assert not isinstance(info.value, DataError)


def test_getitem_returns_the_reason_for_a_bad_file(odd_folder):
    ds = ImageFolder(odd_folder, img_size=8)
    i = [os.path.basename(p) for p in ds.paths].index("truncated.png")
    image, label, index = ds[i]
    with pytest.raises(BadImageError) as info:
        load_image(odd_folder / "truncated.png")
    assert image in str(info.value) and "truncated.png" not in image and label == -1 and index == i


def test_decompression_bomb_is_bad_image(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2x the limit
    with pytest.raises(BadImageError):
        load_image(path)


def test_truncated_images_setting_left_alone():
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_collate_skip_all_bad_and_extensions():
    out = collate_skip([(None, 3, 7), (None, -1, 9)])
    assert out["images"].shape == (0, 3, 1, 1) and out["images"].dtype == torch.uint8
    assert out["labels"].shape == (0,) and out["index"].shape == (0,)
    assert out["skipped"].tolist() == [7, 9]
    assert ".jpg" in S.IMAGE_EXTENSIONS and ".png" in S.IMAGE_EXTENSIONS and ".webp" in S.IMAGE_EXTENSIONS
    assert ".tif" in S.IMAGE_EXTENSIONS and ".pdf" not in S.IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in S.IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------
# 3. build_dataset errors
# ----------------------------------------------------------------------------


def test_error_nonexistent_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError) as info:
        build_dataset(missing)
    msg = str(info.value)
    assert msg == f"data path '{missing}' does not exist (and is not a built-in dataset: digits, fashion-mnist)"


def test_error_empty_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    (tmp_path / ".hidden.jpg").write_bytes(_jpeg_bytes(_noise(4, 4)))
    with pytest.raises(DataError) as info:
        build_dataset(str(tmp_path))
    msg = str(info.value)
    assert msg.startswith(f"no image files found under '{tmp_path}' (looked for .jpg, .jpeg, .png")
    assert msg.endswith("recursively)") and "\n" not in msg


def test_error_single_class(tmp_path):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cats" / "a.png")
    with pytest.raises(DataError) as info:
        build_dataset(str(tmp_path), labeled=True)
    assert str(info.value) == (
        f"'{tmp_path}' has 1 class ('cats'); a labeled task needs one sub-folder per class, at least 2"
    )
    # the same folder is fine unlabeled
    assert len(build_dataset(str(tmp_path), labeled=False)) == 1


def test_error_labeled_files_directly_in_root(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / c / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "loose1.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "loose2.png")
    with pytest.raises(DataError, match=r"has 2 image file\(s\) directly in it"):
        build_dataset(str(tmp_path), labeled=True)


def test_error_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        build_dataset("digits", split="dev")
    with pytest.raises(DataError, match="img_size"):
        build_dataset("digits", img_size=0)
    with pytest.raises(DataError, match="subset"):
        build_dataset("digits", subset=-1)
    f = tmp_path / "file.png"
    Image.new("RGB", (4, 4)).save(f)
    with pytest.raises(DataError, match="not a folder"):
        build_dataset(str(f))


def test_error_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError) as info:
        build_dataset("fashion-mnist")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "/usr/share/datasets/fashion-mnist/" in msg and "\n" not in msg
    assert "KEEL_FASHION_MNIST_DIR" in msg                     # the other way, said in the message


# ----------------------------------------------------------------------------
# 4. a fake fashion-mnist from tiny IDX files
# ----------------------------------------------------------------------------


def _idx(arr: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_fake_fashion(directory, gz: bool = True):
    train_images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4) * 2  # hand-made values
    train_labels = np.array([9, 0, 3, 3, 7, 1], dtype=np.uint8)
    test_images = np.full((2, 4, 4), 77, dtype=np.uint8)
    test_labels = np.array([2, 5], dtype=np.uint8)
    files = {
        "train-images-idx3-ubyte": _idx(train_images),
        "train-labels-idx1-ubyte": _idx(train_labels),
        "t10k-images-idx3-ubyte": _idx(test_images),
        "t10k-labels-idx1-ubyte": _idx(test_labels),
    }
    for name, data in files.items():
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return train_images, train_labels


@pytest.mark.parametrize("gz", [True, False])
def test_fake_fashion_mnist_parses(tmp_path, monkeypatch, gz):
    images, labels = _write_fake_fashion(tmp_path, gz=gz)
    monkeypatch.setenv("KEEL_FASHION_MNIST_DIR", str(tmp_path))

    ds = build_dataset("fashion-mnist", split="train", img_size=4, labeled=True)
    assert isinstance(ds, InMemoryImages) and ds.name == "fashion-mnist"
    assert ds.images.shape == (6, 3, 4, 4) and ds.images.dtype == torch.uint8
    for c in range(3):
        assert torch.equal(ds.images[:, c], torch.from_numpy(images))
    assert ds.labels.tolist() == labels.tolist()
    assert ds.classes[9] == "Ankle boot" and ds.classes[0] == "T-shirt/top" and len(ds.classes) == 10
    img, lab, i = ds[0]
    assert lab == 9 and i == 0 and img.shape == (3, 4, 4)

    big = build_dataset("fashion-mnist", split="train", img_size=8)
    assert big.images.shape == (6, 3, 8, 8)
    # bilinear upsampling keeps the range and the ordering of the ramp
    assert int(big.images[0].min()) >= int(images[0].min()) and int(big.images[0].max()) <= int(images[0].max())
    assert int(big.images[5].float().mean()) > int(big.images[0].float().mean())

    test = build_dataset("fashion-mnist", split="val", img_size=4)
    assert len(test) == 2 and test.labels.tolist() == [2, 5] and (test.images == 77).all()


def test_a_folder_of_the_four_gz_files_is_fashion_mnist(tmp_path, monkeypatch):
    images, labels = _write_fake_fashion(tmp_path, gz=True)
    monkeypatch.setenv("KEEL_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))   # the folder alone is enough
    train, test = labeled_splits(str(tmp_path), img_size=4)
    assert train.labels.tolist() == labels.tolist() and torch.equal(train.images[:, 0], torch.from_numpy(images))
    assert len(test) == 2 and train.classes[9] == "Ankle boot"


def test_fake_fashion_mnist_bad_magic(tmp_path, monkeypatch):
    _write_fake_fashion(tmp_path, gz=False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x09\x03" + bad.read_bytes()[4:])
    monkeypatch.setenv("KEEL_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match="magic"):
        build_dataset("fashion-mnist", split="test", img_size=4)


@pytest.mark.skipif(
    not os.path.isdir(S.DEFAULT_FASHION_MNIST_DIR) or "KEEL_FASHION_MNIST_DIR" in os.environ,
    reason="system fashion-mnist not installed",
)
def test_real_fashion_mnist_test_split():
    ds = build_dataset("fashion-mnist", split="test", img_size=28, labeled=True)
    assert len(ds) == 10000 and ds.images.shape[1:] == (3, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------
# 5. digits
# ----------------------------------------------------------------------------


def test_digits_split_and_labels():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train = build_dataset("digits", split="train", img_size=8, labeled=True)
    test = build_dataset("digits", split="test", img_size=8, labeled=True)
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    assert train.classes == [str(d) for d in range(10)] == test.classes
    assert train.images.shape == (1437, 3, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(test.images.max()) == 255

    all_idx = np.arange(1797)
    test_idx, train_idx = all_idx[all_idx % 5 == 0], all_idx[all_idx % 5 != 0]
    assert not set(test_idx) & set(train_idx)
    assert train.labels.tolist() == target[train_idx].tolist()
    assert test.labels.tolist() == target[test_idx].tolist()
    assert sorted(set(train.labels.tolist())) == list(range(10))

    # pixels are the sklearn values scaled by 255/16
    raw = load_digits().images[test_idx[1]]
    assert torch.equal(test.images[1, 0], torch.from_numpy(np.rint(raw * 255 / 16).astype(np.uint8)))

    up = build_dataset("digits", split="test", img_size=32)
    assert up.images.shape == (360, 3, 32, 32) and int(up.images.max()) == 255
    assert builtin_names() == ["digits", "fashion-mnist"]


# ----------------------------------------------------------------------------
# 6. labeled ImageFolder
# ----------------------------------------------------------------------------


def _save(path, color, size=(12, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_labeled_folder_classes_labels_and_recursion(tmp_path):
    root = tmp_path / "pets"
    _save(root / "zebra" / "z1.png", (10, 10, 10))
    _save(root / "cat" / "c1.PNG", (200, 0, 0))
    _save(root / "cat" / "deep" / "deeper" / "c2.jpg", (200, 0, 0))
    _save(root / "dog" / "d1.bmp", (0, 200, 0))
    _save(root / "dog" / ".hidden" / "d2.png", (0, 200, 0))  # hidden dir skipped
    _save(root / "dog" / "._d3.png", (0, 200, 0))  # hidden file skipped
    (root / "empty").mkdir()  # no images: not a class

    ds = build_dataset(str(root), img_size=6, labeled=True)
    assert ds.classes == ["cat", "dog", "zebra"]
    assert ds.name == "pets" and ds.img_size == 6
    names = [os.path.relpath(p, root) for p in ds.paths]
    assert names == sorted(names) and len(names) == 4
    by_name = dict(zip(names, ds.labels.tolist()))
    assert by_name[os.path.join("cat", "c1.PNG")] == 0
    assert by_name[os.path.join("cat", "deep", "deeper", "c2.jpg")] == 0
    assert by_name[os.path.join("dog", "d1.bmp")] == 1
    assert by_name[os.path.join("zebra", "z1.png")] == 2
    assert ds.labels.dtype == torch.int64

    k = names.index(os.path.join("dog", "d1.bmp"))
    img, label, idx = ds[k]
    assert img.shape == (3, 6, 6) and img.dtype == torch.uint8 and label == 1 and idx == k
    assert (img[1] == 200).all() and (img[0] == 0).all()


def test_split_subfolders_share_class_index(tmp_path):
    root = tmp_path / "data"
    _save(root / "train" / "a" / "1.png", (1, 1, 1))
    _save(root / "train" / "b" / "1.png", (2, 2, 2))
    _save(root / "train" / "c" / "1.png", (3, 3, 3))
    _save(root / "val" / "c" / "1.png", (3, 3, 3))  # test split lacks classes a, b
    _save(root / "val" / "b" / "2.png", (2, 2, 2))

    train = build_dataset(str(root), split="train", labeled=True)
    test = build_dataset(str(root), split="test", labeled=True)
    assert train.classes == test.classes == ["a", "b", "c"]
    assert len(train) == 3 and len(test) == 2
    assert test.labels.tolist() == [1, 2]
    assert all(os.sep + "val" + os.sep in p for p in test.paths)


def test_resize_shorter_side_then_center_crop(tmp_path):
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:20] = (0, 255, 0)
    arr[:, 20:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "x.png")
    img, _, _ = ImageFolder(tmp_path, img_size=5)[0]
    # 30x10 -> 15x5 -> center 5x5 crop is the green middle third
    assert img.shape == (3, 5, 5)
    inner = img[:, :, 1:4]
    assert (inner[1] == 255).all() and (inner[0] == 0).all() and (inner[2] == 0).all()
    assert (img[1] > 200).all()  # the border columns only blend a little with red / blue


# ----------------------------------------------------------------------------
# 7. subset
# ----------------------------------------------------------------------------


def test_subset_deterministic(tmp_path):
    a = build_dataset("digits", subset=100, seed=1)
    b = build_dataset("digits", subset=100, seed=1)
    c = build_dataset("digits", subset=100, seed=2)
    assert isinstance(a, InMemoryImages) and len(a) == 100
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.classes == [str(d) for d in range(10)]
    assert len(build_dataset("digits", split="test", subset=10_000)) == 360  # larger than the data: all

    for i in range(12):
        _save(tmp_path / ("a" if i % 2 else "b") / f"{i:02d}.png", (i, i, i))
    f1 = build_dataset(str(tmp_path), labeled=True, subset=5, seed=0)
    f2 = build_dataset(str(tmp_path), labeled=True, subset=5, seed=0)
    f3 = build_dataset(str(tmp_path), labeled=True, subset=5, seed=3)
    assert isinstance(f1, ImageFolder) and len(f1) == 5 == len(f1.labels)
    assert f1.paths == f2.paths and f1.paths != f3.paths
    for p, lab in zip(f1.paths, f1.labels.tolist()):
        assert f1.classes[lab] == os.path.basename(os.path.dirname(p))
    assert len(build_dataset(str(tmp_path), labeled=True)) == 12  # the full one is untouched


def test_labeled_splits_holds_out_every_fifth_file_of_an_unsplit_folder(tmp_path):
    root = tmp_path / "shapes"
    for i in range(10):
        _save(root / ("a" if i % 2 else "b") / f"{i:02d}.png", (i * 20, 0, 0))
    train, test = S.labeled_splits(str(root), img_size=4)
    assert len(train) == 8 and len(test) == 2
    assert not set(train.paths) & set(test.paths)
    full = build_dataset(str(root), img_size=4, labeled=True)
    assert test.paths == [full.paths[0], full.paths[5]]


def test_labeled_splits_uses_split_folders_and_builtins_as_they_are(tmp_path):
    for split in ("train", "val"):
        for c in ("x", "y"):
            _save(tmp_path / "d" / split / c / "1.png", (1, 2, 3))
    train, test = S.labeled_splits(str(tmp_path / "d"), img_size=4)
    assert all("/train/" in p for p in train.paths) and all("/val/" in p for p in test.paths)
    tr, te = S.labeled_splits("digits", img_size=8)
    assert len(tr) + len(te) == 1797 and len(te) == 360


def test_training_data_leaves_out_an_exclude_list(tmp_path):
    from keel.data.sources import training_data
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        write_good_rgb_jpeg(root / f"{i}.jpg")
    drop = tmp_path / "drop.txt"
    drop.write_text(f"# keel dedup\n{root / '1.jpg'}\n3.jpg\n")           # absolute and relative
    ds = training_data(str(root), 16, exclude=str(drop))
    assert sorted(os.path.basename(p) for p in ds.paths) == ["0.jpg", "2.jpg", "4.jpg", "5.jpg"] and ds.whole
    assert len(training_data(str(root), 16, exclude=str(drop), subset=2, seed=1)) == 2
    with pytest.raises(DataError, match="data.exclude applies to image folders"):
        training_data("digits", 16, exclude=str(drop))
