"""The training loop on shards: a run equals itself resumed mid-epoch, skipped samples are named,
and whole-image batches (a padded canvas with sizes) train like any other."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from keel.data.shards_write import write_shards
from keel.jobs.pretrain import pretrain

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    src = root / "src"
    src.mkdir()
    for i in range(52):                               # images of three shapes
        h, w = [(12, 16), (16, 12), (10, 10)][i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
    write_shards(src, root / "out", per_shard=9, workers=1, progress=False)
    return root / "out"


def _cfg(make_cfg, shard_dir, *extra):
    return make_cfg(f"data.source=shards:{shard_dir}", "data.subset=0", "data.shuffle_buffer=16",
                    "train.batch_size=8", "train.epochs=2", *extra)


def _losses(run):
    return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_pretraining_from_shards_resumes_mid_epoch_exactly(make_cfg, shard_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    full = pretrain(_cfg(make_cfg, shard_dir), a, quiet=True)
    assert full["steps"] == 2 * (52 // 8)                   # 6 steps an epoch: the 4 left over wait
    first = pretrain(_cfg(make_cfg, shard_dir, "train.max_steps=4"), b, quiet=True)
    assert first["steps"] == 4
    pretrain(_cfg(make_cfg, shard_dir), b, resume=True, quiet=True)
    la, lb = _losses(a), _losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 13))
    assert [x for _, x in la] == [x for _, x in lb]
    wa, wb = load_file(a / "backbone.safetensors"), load_file(b / "backbone.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    card = json.loads((a / "card.json").read_text())
    assert card["data"]["images"] == 52 and card["config"]["data"]["crop_from"] == "whole"
