"""The training loop: exact resume, the NaN guard, run artifacts, and folders with bad files."""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import yaml
import torch
from PIL import Image
from safetensors.torch import load_file

import keel
from keel.config import load_config
from keel.data.sources import build_dataset
from keel.engine.checkpoint import load_checkpoint, sha256
from keel.jobs.pretrain import export_run, pretrain
from keel.engine.trainer import Trainer
from keel.data.sources import DataError
from keel.errors import TrainingError
from keel.models.registry import model_kwargs
from keel.tasks.ssl.simclr import SimCLR
from keel.models.registry import create_model

STEPS_PER_EPOCH = 4   # 256 images, batch 64 (see conftest)


class NaNAfter(SimCLR):
    """SimCLR whose loss becomes NaN from step ``nan_at`` (1-based) on."""
    nan_at = 10 ** 9

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.calls = 0

    def training_step(self, views):
        out = super().training_step(views)
        self.calls += 1
        if self.calls >= self.nan_at:
            out["loss"] = out["loss"] * float("nan")
        return out


def fit(cfg, run_dir, method_cls=SimCLR, resume=False, quiet=True):
    """What pretrain() does, keeping the method so that tests can look at it."""
    data = build_dataset(cfg.data.source, "train", cfg.data.img_size, subset=cfg.data.subset, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    method = method_cls(create_model(cfg.model.name, **model_kwargs(cfg)), cfg)
    trainer = Trainer(cfg, run_dir, resume=resume, quiet=quiet)
    result = trainer.fit(method, data)
    export_run(cfg, method, len(data), result, trainer.steps_per_epoch_, run_dir)
    return result, method


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(run_a, run_b):
    a, b = load_file(run_a / "backbone.safetensors"), load_file(run_b / "backbone.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def assert_same_losses(run_a, run_b):
    la = [(m["step"], m["loss"]) for m in metrics(run_a)]
    lb = [(m["step"], m["loss"]) for m in metrics(run_b)]
    assert [s for s, _ in lb] == list(range(1, 2 * STEPS_PER_EPOCH + 1))   # each step logged once
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (s, x), (_, y) in zip(la, lb):
        assert abs(x - y) <= 1e-6, f"step {s}: {x} != {y}"
    assert metrics(run_a)[-1]["loss"] == pytest.approx(metrics(run_b)[-1]["loss"], abs=1e-6)


@pytest.fixture(scope="module")
def run_a(tiny_cfg_factory, tmp_path_factory):
    """An uninterrupted 2-epoch run, shared by the module: (cfg, run_dir, result, method)."""
    cfg = tiny_cfg_factory()
    run_dir = tmp_path_factory.mktemp("run_a")
    result, method = fit(cfg, run_dir)
    return cfg, run_dir, result, method


# ---------------------------------------------------------------- resume
def test_run_a_trains(run_a):
    cfg, run_dir, result, _ = run_a
    assert result["steps"] == 2 * STEPS_PER_EPOCH and result["skipped"] == 0 and result["knn"] is None
    assert math.isfinite(result["loss"])
    assert result["loss"] == metrics(run_dir)[-1]["loss"]
    assert load_checkpoint(run_dir)["step"] == 2 * STEPS_PER_EPOCH


def test_resume_at_epoch_boundary_is_exact(run_a, tiny_cfg_factory, tmp_path):
    _, dir_a, result_a, _ = run_a
    run_b = tmp_path / "b"
    first = pretrain(tiny_cfg_factory(f"train.max_steps={STEPS_PER_EPOCH}"), run_b, quiet=True)
    assert first["steps"] == STEPS_PER_EPOCH
    assert load_checkpoint(run_b)["step"] == STEPS_PER_EPOCH
    assert json.loads((run_b / "card.json").read_text())["finished"] is False
    second = pretrain(tiny_cfg_factory(), run_b, resume=True, quiet=True)
    assert second["steps"] == 2 * STEPS_PER_EPOCH
    assert second["loss"] == pytest.approx(result_a["loss"], abs=1e-6)
    assert json.loads((run_b / "card.json").read_text())["finished"] is True
    assert_same_losses(dir_a, run_b)
    assert_same_weights(dir_a, run_b)


def test_resume_mid_epoch_is_exact(run_a, tiny_cfg_factory, tmp_path):
    _, dir_a, _, _ = run_a
    run_b = tmp_path / "b"
    first = pretrain(tiny_cfg_factory("train.ckpt_every=3", "train.max_steps=5"), run_b, quiet=True)
    assert first["steps"] == 5
    assert load_checkpoint(run_b)["step"] == 5     # the stop itself is checkpointed, not only step 3
    pretrain(tiny_cfg_factory("train.ckpt_every=3"), run_b, resume=True, quiet=True)
    assert load_checkpoint(run_b)["step"] == 2 * STEPS_PER_EPOCH
    assert_same_losses(dir_a, run_b)
    assert_same_weights(dir_a, run_b)


def test_resume_after_a_crash_redoes_the_lost_steps(run_a, tiny_cfg_factory, tmp_path):
    """Crash at step 5 with the last checkpoint at step 3: metrics of step 4 were written but
    are redone; the finished run still equals the uninterrupted one, line for line."""
    _, dir_a, _, _ = run_a
    run_b = tmp_path / "b"
    NaNAfter.nan_at = 5
    with pytest.raises(TrainingError):
        fit(tiny_cfg_factory("train.ckpt_every=3"), run_b, method_cls=NaNAfter)
    assert [m["step"] for m in metrics(run_b)] == [1, 2, 3, 4]
    assert load_checkpoint(run_b)["step"] == 3
    # TensorBoard reads event files in name order: <seconds>.<host>.<pid>.<counter>. A resume in the
    # same process and second would sort by this process's counter (9 before 10) and could read the
    # resumed file first; a real resume is another process, seconds later
    time.sleep(1.1)
    pretrain(tiny_cfg_factory("train.ckpt_every=3"), run_b, resume=True, quiet=True)
    assert_same_losses(dir_a, run_b)
    assert_same_weights(dir_a, run_b)
    # TensorBoard shows each step once too (events after the checkpoint are purged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_b / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, 2 * STEPS_PER_EPOCH + 1))


def test_the_same_run_started_again_continues_from_its_checkpoint(run_a, tiny_cfg_factory, tmp_path, capsys,
                                                                  kill_at_step):
    """A requeued job or a restarted pod runs the same command again, without --resume: with
    train.auto_resume (default) it continues and ends as the uninterrupted run; another config in
    that directory, or auto_resume off, starts over."""
    _, dir_a, _, _ = run_a

    def killed_at_step_5(run_dir, *extra):
        with kill_at_step(SimCLR, 5):
            pretrain(tiny_cfg_factory("train.ckpt_every=3", *extra), run_dir, quiet=True)
        assert load_checkpoint(run_dir)["step"] == 3

    run_b = tmp_path / "b"
    killed_at_step_5(run_b)
    capsys.readouterr()
    pretrain(tiny_cfg_factory("train.ckpt_every=3", "data.num_workers=0"), run_b)
    assert "resuming" in capsys.readouterr().out
    assert_same_losses(dir_a, run_b)
    assert_same_weights(dir_a, run_b)
    for other in ("train.lr=0.5", "train.auto_resume=false"):
        run_c = tmp_path / other.replace("=", "-")
        killed_at_step_5(run_c, *(["train.auto_resume=false"] if "auto" in other else []))
        pretrain(tiny_cfg_factory("train.ckpt_every=3", other), run_c, quiet=True)
        assert [m["step"] for m in metrics(run_c)][:5] == [1, 2, 3, 4, 1]      # from the start


def test_resume_is_exact_with_lars_and_clipping(tiny_cfg_factory, tmp_path):
    # LARS keeps its own momentum buffers and per-group flags: they must survive a weights-only load
    opts = ("train.optimizer=lars", "train.lr=0.3", "train.clip_grad=1.0", "train.epochs=1")
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain(tiny_cfg_factory(*opts), a, quiet=True)
    pretrain(tiny_cfg_factory(*opts, "train.max_steps=2"), b, quiet=True)
    pretrain(tiny_cfg_factory(*opts), b, resume=True, quiet=True)
    la, lb = metrics(a), metrics(b)
    assert [m["step"] for m in lb] == [1, 2, 3, 4]
    assert [m["loss"] for m in la] == pytest.approx([m["loss"] for m in lb], abs=1e-6)
    assert_same_weights(a, b)


# ---------------------------------------------------------------- NaN guard
@pytest.mark.parametrize("log_every, ckpt_every, nan_at, good_ckpt", [
    (1, 2, 5, 4),    # caught on the step it happens
    (10, 2, 3, 2),   # caught at the next checkpoint, which is then not written
])
def test_nan_loss_stops_with_clear_error(make_cfg, tmp_path, log_every, ckpt_every, nan_at, good_ckpt):
    cfg = make_cfg(f"train.log_every={log_every}", f"train.ckpt_every={ckpt_every}")
    run = tmp_path / "run"
    NaNAfter.nan_at = nan_at
    with pytest.raises(TrainingError) as e:
        fit(cfg, run, method_cls=NaNAfter)
    msg = str(e.value)
    assert "NaN" in msg and f"step {good_ckpt}" in msg and "train.lr" in msg and "\n" not in msg
    state = load_checkpoint(run)
    assert state["step"] == good_ckpt < nan_at
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())
    assert all(math.isfinite(m["loss"]) for m in metrics(run))
    assert not (run / "backbone.safetensors").exists()   # no artifact from a failed run


def test_nan_on_first_step_without_checkpoint(make_cfg, tmp_path):
    NaNAfter.nan_at = 1
    with pytest.raises(TrainingError, match="no checkpoint had been written yet"):
        fit(make_cfg(), tmp_path / "run", method_cls=NaNAfter)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_fewer_images_than_a_batch_train_with_the_largest_batch_the_data_allows(make_cfg, tmp_path, capsys):
    result, _ = fit(make_cfg("train.batch_size=512", "train.max_steps=2"), tmp_path / "run", quiet=False)
    assert "train.batch_size: 256 instead of 512, the data has 256 images" in capsys.readouterr().out
    assert result["steps"] == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 256                    # config.yaml records the batch used


# ---------------------------------------------------------------- artifacts
def test_run_artifacts(run_a):
    cfg, run_dir, result, method = run_a
    names = set(os.listdir(run_dir))
    assert {"config.yaml", "metrics.jsonl", "backbone.safetensors", "card.json", "curves.png", "tb",
            "checkpoints"} <= names
    assert load_config(run_dir / "config.yaml") == cfg

    lines = metrics(run_dir)
    assert len(lines) == 2 * STEPS_PER_EPOCH
    for m in lines:
        assert {"step", "loss", "lr", "img_per_s"} <= set(m)
        assert math.isfinite(m["loss"]) and m["lr"] > 0 and m["img_per_s"] > 0
    assert lines[-1]["epoch"] == 2.0

    card = json.loads((run_dir / "card.json").read_text())
    assert card["sha256"] == sha256(run_dir / "backbone.safetensors")
    assert card["model"] == "resnet10_cifar" and card["model_kwargs"] == {"img_size": 8}
    assert card["steps"] == 2 * STEPS_PER_EPOCH and card["epochs"] == 2 and card["finished"] is True
    assert card["data"]["images"] == 256 and card["metrics"]["final_loss"] == result["loss"]
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tb"))

    backbone = keel.load_backbone(run_dir).eval()
    trained = method.backbone.eval()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(backbone.embed(x), trained.embed(x), rtol=0, atol=0)
    method.train()


def test_tampered_artifact_is_refused(run_a, tmp_path):
    _, run_dir, _, _ = run_a
    for name in ("backbone.safetensors", "card.json"):
        (tmp_path / name).write_bytes((run_dir / name).read_bytes())
    w = tmp_path / "backbone.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        keel.load_backbone(tmp_path)


# ---------------------------------------------------------------- image folders with bad files
def _image_folder(root, n_good, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir()
    for i in range(n_good):
        arr = rng.integers(0, 256, size=(10 + i % 3, 12, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img_{i:03d}.png")
    bad = [root / "bad_empty.png", root / "bad_text.jpg", root / "bad_truncated.png"]
    bad[0].write_bytes(b"")
    bad[1].write_text("this is not a JPEG\n")
    big = root / "big.png"
    Image.fromarray(rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(big)
    bad[2].write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    big.unlink()
    return sorted(str(p) for p in bad)


def test_folder_with_bad_files(make_cfg, tmp_path, capsys):
    folder = tmp_path / "images"
    bad = _image_folder(folder, 61)   # 61 + 3 = 64 files = 2 full batches: nothing is dropped
    cfg = make_cfg(f"data.source={folder}", "data.subset=0", "train.batch_size=32", "train.epochs=1",
                   "data.num_workers=0")
    run = tmp_path / "run"
    result = pretrain(cfg, run)
    assert result["steps"] == 2 and math.isfinite(result["loss"])
    assert result["skipped"] == 3
    lines = [line.split("\t") for line in (run / "skipped.txt").read_text().splitlines()]
    assert [path for path, _ in lines] == bad
    assert all(why and "/" not in why for _, why in lines)       # one reason per file, e.g. "truncated"
    assert json.loads((run / "card.json").read_text())["data"]["skipped"] == 3
    out = capsys.readouterr().out
    assert "3 files skipped" in out


def test_batches_with_bad_files_are_refilled_to_full_size(make_cfg, tmp_path, monkeypatch):
    """Skipped files must not shrink a batch: under DDP every process needs the same size."""
    folder = tmp_path / "images"
    _image_folder(folder, 29)           # 29 good + 3 bad = one batch of 32
    cfg = make_cfg(f"data.source={folder}", "data.subset=0", "train.batch_size=32", "train.epochs=1")
    sizes = []
    from keel.tasks.ssl.simclr import SimCLR
    orig = SimCLR.make_views

    def spy(self, images, generator, image_sizes=None):
        sizes.append(len(images))
        return orig(self, images, generator, image_sizes)

    monkeypatch.setattr(SimCLR, "make_views", spy)
    result = pretrain(cfg, tmp_path / "run", quiet=True)
    assert result["skipped"] == 3 and sizes == [32]


def test_a_batch_of_only_bad_files_is_a_clear_error(make_cfg, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(8):
        (folder / f"x{i}.jpg").write_text("not an image")
    cfg = make_cfg(f"data.source={folder}", "data.subset=0", "train.batch_size=4", "train.epochs=1")
    with pytest.raises(DataError, match="could be decoded"):
        pretrain(cfg, tmp_path / "run", quiet=True)


# ---------------------------------------------------------------- weight-decay schedule
from keel.engine.optim import cosine_wd  # noqa: E402


@pytest.fixture
def wd_seen(monkeypatch):
    """Every group's weight decay at each optimizer step of the runs in a test."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([g["weight_decay"] for g in self.param_groups])
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    return seen


WD = ("train.weight_decay=0.04", "train.weight_decay_end=0.4")


def test_weight_decay_schedule_on_decay_group_only(make_cfg, tmp_path, wd_seen):
    # 2 epochs = 8 steps in the schedule, stopped after 3: the wd follows the whole run's cosine
    pretrain(make_cfg(*WD, "train.max_steps=3"), tmp_path / "run", quiet=True)
    want = [cosine_wd(s, 2 * STEPS_PER_EPOCH, 0.04, 0.4) for s in range(3)]
    assert want[0] == pytest.approx(0.04) and 0.04 < want[1] < want[2] < 0.4
    assert [w[0] for w in wd_seen] == pytest.approx(want)          # decay group (weights)
    assert [w[1] for w in wd_seen] == [0.0, 0.0, 0.0]             # norms and biases: never
    assert [m["wd"] for m in metrics(tmp_path / "run")] == pytest.approx(want)
    groups = load_checkpoint(tmp_path / "run")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == pytest.approx([want[-1], 0.0])


def test_weight_decay_schedule_reaches_its_end_and_resumes_exactly(make_cfg, tmp_path, wd_seen):
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain(make_cfg(*WD, "train.epochs=1"), a, quiet=True)
    unbroken = [w[0] for w in wd_seen]
    assert unbroken[0] == pytest.approx(0.04) and unbroken[-1] == pytest.approx(0.4)
    assert unbroken[1] == pytest.approx(0.4 - 0.36 * (1 + math.cos(math.pi / 3)) / 2)   # step 1 of 0..3
    wd_seen.clear()
    pretrain(make_cfg(*WD, "train.epochs=1", "train.max_steps=2"), b, quiet=True)
    pretrain(make_cfg(*WD, "train.epochs=1"), b, resume=True, quiet=True)
    assert [w[0] for w in wd_seen] == unbroken
    assert [m["wd"] for m in metrics(b)] == [m["wd"] for m in metrics(a)] == pytest.approx(unbroken)
    assert [m["loss"] for m in metrics(b)] == pytest.approx([m["loss"] for m in metrics(a)], abs=1e-6)
    assert_same_weights(a, b)


def test_weight_decay_constant_without_an_end(make_cfg, tmp_path, wd_seen):
    pretrain(make_cfg("train.weight_decay=0.04", "train.max_steps=3"), tmp_path / "run", quiet=True)
    assert wd_seen == [[0.04, 0.0]] * 3
    assert all("wd" not in m for m in metrics(tmp_path / "run"))


def test_weight_decay_schedule_restarts_with_each_stage(make_cfg, tmp_path, wd_seen):
    # each stage is a run of its own, with its own schedule (as for the lr)
    pretrain(make_cfg(*WD, "stages=[{train: {epochs: 1}}, {train: {epochs: 1}}]"), tmp_path / "run", quiet=True)
    one = [cosine_wd(s, STEPS_PER_EPOCH, 0.04, 0.4) for s in range(STEPS_PER_EPOCH)]
    assert [w[0] for w in wd_seen] == pytest.approx(one + one)
    assert all(w[1] == 0.0 for w in wd_seen)


def test_weight_decay_schedule_needs_a_start(make_cfg, tmp_path):
    with pytest.raises(TrainingError, match="weight_decay=0.0, which must be > 0"):
        pretrain(make_cfg("train.weight_decay=0", "train.weight_decay_end=0.4"), tmp_path / "run", quiet=True)
