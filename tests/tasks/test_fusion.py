"""Fusion heads on embeddings where image and text each carry half of the label."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    from keel.jobs.fusion import fusion_from_run
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

    # the same through keel finetune: the kept head, saved, gives back the reported test top-1
    from keel.cli import main
    from keel.evaluate.zeroshot import embed_dataset, embed_texts
    from keel.data.pairs import PairData, read_pairs
    from keel.jobs.clip import load_clip
    from keel.jobs.fusion import load_fusion
    assert main(["finetune", f"model.backbone={res['run_dir']}", f"data.source={tmp_path / 'pairs'}",
                 "train.epochs=5", "task.fusion=attention", "--out", str(tmp_path / "fused")]) == 0
    result = json.loads((tmp_path / "fused" / "result.json").read_text())
    assert result["kept"] == "attention" and result["attention"] == out["attention"]   # same seed, same heads
    head, meta = load_fusion(tmp_path / "fused")
    assert meta["classes"] == ["cold", "warm"] and (tmp_path / "fused" / "config.yaml").is_file()
    task, tok = load_clip(res["run_dir"])
    rec = read_pairs(str(tmp_path / "pairs"))
    img, _, rows = embed_dataset(task, PairData(rec, tok.encode(rec.texts), task.img_size))
    txt = embed_texts(task, tok, [rec.texts[int(r)] for r in rows])
    test = torch.arange(len(rows)) % 5 == 0
    with torch.no_grad():
        pred = head(img[test], txt[test]).argmax(1)
    assert 100.0 * float((pred == rec.labels[rows][test]).float().mean()) == pytest.approx(result["attention"])


def test_standardisation_is_kept_in_the_head():
    img, txt = torch.randn(50, 4) * 5 + 3, torch.randn(50, 6) - 2
    h = FusionHead("concat", 4, 6, 3, hidden=8).eval()
    h.standardise_with(img, txt)
    ref = FusionHead("concat", 4, 6, 3, hidden=8).eval()
    ref.load_state_dict({k: v for k, v in h.state_dict().items()})
    ref.img_mean.zero_(), ref.img_std.fill_(1), ref.txt_mean.zero_(), ref.txt_std.fill_(1)
    z_img = (img - img.mean(0)) / img.std(0)
    z_txt = (txt - txt.mean(0)) / txt.std(0)
    assert torch.allclose(h(img, txt), ref(z_img, z_txt), atol=1e-5)
