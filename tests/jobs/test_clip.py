"""keel clip train as a job: a run killed mid-way and resumed with ``--resume`` ends with the
weights of an unbroken run, and 2 processes (gloo, torchrun's environment) train the towers of
1 process on the same global batch."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from keel.config import load_config
from keel.data.pairs import PairRecords
from keel.jobs.clip import clip_train
from keel.tasks.clip import ClipTask
from keel.tasks.clip_config import ClipConfig

COLORS = [("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220)), ("yellow", (230, 220, 30))]


def _pairs(n: int = 64) -> PairRecords:
    g = torch.Generator().manual_seed(0)
    images, texts = [], []
    for i in range(n):
        name, rgb = COLORS[i % 4]
        base = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 16, 16)
        images.append((base + 25 * torch.randn(3, 16, 16, generator=g)).clamp(0, 255).to(torch.uint8))
        texts.append(["a {} square", "something {}", "{} colour"][i % 3].format(name))
    return PairRecords(texts, images=torch.stack(images), name="colours")


def _cfg(out: Path, *extra: str) -> ClipConfig:
    # crop_scale_min=1: every view is the whole image, so views do not depend on which process draws
    # them; a ViT (LayerNorm) image tower: no per-process BatchNorm statistics
    return load_config(None, ["model.image=random:vit_tiny_patch4_32", "data.img_size=16", "model.text=text_tiny",
                              "model.embed_dim=32", "data.vocab_size=300", "data.crop_scale_min=1.0",
                              "data.num_workers=0", "train.batch_size=16", "train.epochs=2", "train.lr=1e-3",
                              "train.device=cpu", "train.log_every=1", f"train.out_dir={out}", *extra], cls=ClipConfig)


def _weights(run: Path) -> dict:
    return load_file(str(run / "clip.safetensors"))


def test_a_killed_run_resumed_ends_as_an_unbroken_one(tmp_path, kill_at_step):
    root = tmp_path / "pairs"
    root.mkdir()
    pairs = _pairs(48)
    for i, (img, text) in enumerate(zip(pairs.images, pairs.texts)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(text)
    extra = (f"data.source={root}", "train.ckpt_every=2", "train.epochs=2", "data.crop_scale_min=0.5")
    clip_train(_cfg(tmp_path, *extra), tmp_path / "whole", quiet=True)

    with kill_at_step(ClipTask, 5):
        clip_train(_cfg(tmp_path, *extra), tmp_path / "cut", quiet=True)
    assert not (tmp_path / "cut" / "clip.safetensors").exists()
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4

    from keel.cli import main
    assert main(["clip", "train", "--resume", str(tmp_path / "cut")]) == 0
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cut" / "tokenizer.json").read_text() == (tmp_path / "whole" / "tokenizer.json").read_text()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))         # 48 pairs / 16 = 3 steps an epoch; each logged once
    assert main(["clip", "train", "--resume", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_two_processes_train_the_towers_of_one(tmp_path, launch_workers):
    one = clip_train(_cfg(tmp_path), tmp_path / "one", quiet=True, pairs=_pairs())
    results = launch_workers(__file__, tmp_path)
    assert [r["steps"] for r in results] == [one["steps"]] * 2 == [8, 8]
    # the default run directory holds the time: every process uses rank 0's
    two = Path(results[0]["run_dir"])
    assert results[1]["run_dir"] == str(two) and two.parent == tmp_path and two.name.startswith("clip-vit_tiny")
    assert all(abs(r["loss"] - one["loss"]) < 1e-4 for r in results)
    a, b = _weights(tmp_path / "one"), _weights(two)
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("qkv.bias"):
            # the key bias adds the same amount to every score of a query, which softmax ignores: its
            # gradient is rounding noise, which Adam scales up to steps of the lr; q and v must agree
            n = len(x) // 3
            x, y = torch.cat([x[:n], x[2 * n:]]), torch.cat([y[:n], y[2 * n:]])
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=k)


def _worker(task: Path) -> None:
    import os
    import keel.jobs.clip
    from keel.engine import distributed as D
    if os.environ["RANK"] == "1":    # a clock that reads apart: the default run directory must still be rank 0's
        keel.jobs.clip.time = type("Clock", (), {"strftime": staticmethod(lambda fmt: "another-second")})
    res = clip_train(_cfg(task), None, quiet=True, pairs=_pairs())
    torch.save({"steps": res["steps"], "loss": res["loss"], "run_dir": res["run_dir"]}, task / f"rank{D.rank()}.pt")
    D.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
