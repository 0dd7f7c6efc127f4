"""Fusion heads on embeddings where image and text each carry half of the label."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from keel.tasks.fusion import FusionHead, fusion_eval


def _split_label(n, seed, dim=8):
    """label = 2a + b: a (shape) is only in the image embedding, b (colour) only in the text's."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    img = torch.randn(n, dim, generator=g) * 0.3
    txt = torch.randn(n, dim, generator=g) * 0.3
    img[:, 0] += 2 * a - 1
    txt[:, 3] += 2 * b - 1
    return img, txt, 2 * a + b


def test_fusion_beats_each_tower_when_each_carries_half_the_label():
    out = fusion_eval(_split_label(400, 0), _split_label(200, 1), 4, epochs=40, hidden=32)
    # one tower alone knows one of two bits: at most about 50%
    assert out["image"] < 60 and out["text"] < 60
    assert out["concat"] >= 95 and out["attention"] >= 95
    assert out["concat"] >= out["best_single"] and out["best_single"] == max(out["image"], out["text"])


def test_heads_use_only_their_inputs():
    torch.manual_seed(0)
    img, txt = torch.randn(5, 4), torch.randn(5, 6)
    for kind, changes_with_text in (("image", False), ("text", True), ("concat", True), ("attention", True)):
        h = FusionHead(kind, 4, 6, 3, hidden=8).eval()
        a, b = h(img, txt), h(img, txt + 1)
        assert a.shape == (5, 3)
        assert (not torch.allclose(a, b)) == changes_with_text, kind


def test_fusion_from_a_clip_run(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_clip import _cfg, _write_folder
    from keel.jobs.clip import clip_train
    from keel.tasks.fusion import fusion_from_run
    _write_folder(tmp_path / "flat", n=32)
    # labeled pairs: class sub-folders, a caption beside each image
    files = sorted((tmp_path / "flat").glob("00*.png"))
    for i, cls in enumerate(["warm", "cold"]):
        (tmp_path / "pairs" / cls).mkdir(parents=True)
        for f in files[i::2]:
            f.rename(tmp_path / "pairs" / cls / f.name)
            f.with_suffix(".txt").rename(tmp_path / "pairs" / cls / f.with_suffix(".txt").name)
    res = clip_train(_cfg(tmp_path, "train.epochs=1", "train.batch_size=16"), tmp_path / "run", quiet=True)
    out = fusion_from_run(res["run_dir"], str(tmp_path / "pairs"), epochs=5)
    assert out["train"] + out["test"] == 32 and out["classes"] == 2
    assert set(out) >= {"image", "text", "concat", "attention"}
