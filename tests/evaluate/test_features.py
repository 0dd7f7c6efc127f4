import os
import sys
import types

import pytest
import torch
from torch import nn

from keel.evaluate.features import cached_features, extract_features


def transform(images):
    return (images.float() / 255.0 - 0.5) / 0.25


class TinyBackbone(nn.Module):
    def __init__(self, size=6, dim=5):
        super().__init__()
        self.fc = nn.Linear(3 * size * size, dim)
        self.drop = nn.Dropout(0.5)  # makes train mode visibly different from eval mode
        self.calls = 0

    def embed(self, x):
        self.calls += 1
        return self.fc(self.drop(x.flatten(1)))


class Images:
    """Stand-in for keel.data.sources.InMemoryImages: only the attributes used."""

    def __init__(self, n=11, size=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.classes = ["a", "b", "c"]


class Files(torch.utils.data.Dataset):
    """Stand-in for an ImageFolder: items (uint8 image or None when undecodable, label, index)."""

    def __init__(self, mem, bad):
        self.mem, self.bad = mem, set(bad)

    def __len__(self):
        return self.mem.images.shape[0]

    def __getitem__(self, i):
        image = None if i in self.bad else self.mem.images[i]
        return image, int(self.mem.labels[i]), i


def _collate_skip(batch):
    good = [item for item in batch if item[0] is not None]
    images = torch.stack([it[0] for it in good]) if good else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
    return {"images": images,
            "labels": torch.tensor([it[1] for it in good], dtype=torch.int64),
            "index": torch.tensor([it[2] for it in good], dtype=torch.int64),
            "skipped": torch.tensor([it[2] for it in batch if it[0] is None], dtype=torch.int64)}


@pytest.fixture
def collate_available(monkeypatch):
    """Use keel.data.sources.collate_skip when it exists, a stand-in with its contract otherwise."""
    try:
        from keel.data.sources import collate_skip  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "keel.data.sources",
                            types.SimpleNamespace(collate_skip=_collate_skip))


def _reference(backbone, images):
    backbone.eval()
    with torch.no_grad():
        return torch.cat([backbone.embed(transform(images[i:i + 1])) for i in range(images.shape[0])])


def test_in_memory_rows_match_embed_and_mode_restored():
    torch.manual_seed(0)
    backbone, data = TinyBackbone(), Images()
    backbone.train()
    backbone.fc.eval()  # a mixed state must come back exactly as it was
    feats, labels = extract_features(backbone, data, transform, batch_size=4)
    assert backbone.training and backbone.drop.training and not backbone.fc.training
    assert backbone.calls == 3  # 11 images in batches of 4
    assert feats.dtype == torch.float32 and feats.device.type == "cpu" and feats.shape == (11, 5)
    assert labels.dtype == torch.int64 and torch.equal(labels, data.labels)
    torch.testing.assert_close(feats, _reference(backbone, data.images), rtol=1e-5, atol=1e-6)


def test_file_dataset_drops_undecodable_images(collate_available):
    torch.manual_seed(1)
    backbone, data = TinyBackbone(), Images(n=10, seed=1)
    files = Files(data, bad={2, 3, 9})
    feats, labels = extract_features(backbone, files, transform, batch_size=4)
    keep = torch.tensor([i for i in range(10) if i not in {2, 3, 9}])
    assert feats.shape == (7, 5)
    assert torch.equal(labels, data.labels[keep])
    torch.testing.assert_close(feats, _reference(backbone, data.images[keep]), rtol=1e-5, atol=1e-6)


def test_file_dataset_with_a_fully_bad_batch(collate_available):
    backbone, data = TinyBackbone(), Images(n=6, seed=2)
    feats, labels = extract_features(backbone, Files(data, bad={0, 1, 2}), transform, batch_size=3)
    assert feats.shape == (3, 5) and torch.equal(labels, data.labels[3:])


def test_autocast_bfloat16_returns_float32_close_to_fp32():
    torch.manual_seed(3)
    backbone, data = TinyBackbone(), Images(seed=3)
    ref, _ = extract_features(backbone, data, transform)
    feats, _ = extract_features(backbone, data, transform, amp_dtype=torch.bfloat16, progress=True)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, ref, rtol=0.05, atol=0.05)
    assert not torch.equal(feats, ref)  # autocast really ran in bfloat16


def test_cache_round_trip_and_no_second_extraction(tmp_path):
    torch.manual_seed(4)
    backbone, data = TinyBackbone(), Images(seed=4)
    path = tmp_path / "sub" / "train.safetensors"
    feats, labels = cached_features(backbone, data, transform, path, batch_size=5)
    calls = backbone.calls
    assert calls == 3 and path.is_file()
    assert os.listdir(path.parent) == ["train.safetensors"]  # no temporary file left behind

    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"features", "labels"}

    feats2, labels2 = cached_features(backbone, data, transform, str(path), batch_size=5)
    assert backbone.calls == calls  # loaded, not recomputed
    assert torch.equal(feats2, feats) and torch.equal(labels2, labels)
    assert feats2.dtype == torch.float32 and labels2.dtype == torch.int64


def test_no_cache_path_extracts_every_time():
    backbone, data = TinyBackbone(), Images(seed=5)
    a, _ = cached_features(backbone, data, transform, None)
    b, _ = cached_features(backbone, data, transform, None)
    assert backbone.calls == 2 and torch.equal(a, b)


def test_empty_dataset():
    data = Images(n=0)
    feats, labels = extract_features(TinyBackbone(), data, transform)
    assert feats.shape[0] == 0 and labels.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_autocast():
    torch.manual_seed(6)
    backbone, data = TinyBackbone(), Images(seed=6)
    ref, labels = extract_features(backbone, data, transform)
    feats, labels2 = extract_features(backbone.cuda(), data, transform, device="cuda",
                                      amp_dtype=torch.bfloat16)
    assert feats.device.type == "cpu" and feats.dtype == torch.float32
    assert torch.equal(labels, labels2)
    torch.testing.assert_close(feats, ref, rtol=0.05, atol=0.05)
