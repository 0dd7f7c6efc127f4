"""keel.engine.checkpoint: checkpoints written atomically, weights-only loads, verified backbone artifacts."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from keel.engine.checkpoint import (export_backbone, load_backbone, load_checkpoint, read_card,
                                    save_checkpoint, sha256)
from keel.models.registry import create_model


# ---------------------------------------------------------------- atomic writes (keel.files)
def test_atomic_write_failing_torch_save_keeps_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 3, "w": torch.ones(2)})

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("cannot pickle this")

    with pytest.raises(pickle.PicklingError):
        save_checkpoint(path, {"step": 4, "w": torch.zeros(2), "bad": Unpicklable()})
    assert load_checkpoint(path)["step"] == 3
    assert os.listdir(path.parent) == ["last.pt"]


# ---------------------------------------------------------------- training checkpoints
def test_checkpoint_round_trip_and_run_dir_lookup(tmp_path):
    state = {"method": {"w": torch.arange(6.0).view(2, 3)}, "optimizer": {"state": {}, "param_groups": []},
             "step": 7, "history": {"loss": [[1, 2.5]], "knn": []}, "config": {"train": {"lr": 0.1}},
             "skipped": [3, 9]}
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", state)
    for where in (tmp_path, tmp_path / "checkpoints" / "last.pt", str(tmp_path)):
        back = load_checkpoint(where)
        assert back["step"] == 7 and back["history"] == state["history"] and back["skipped"] == [3, 9]
        torch.testing.assert_close(back["method"]["w"], state["method"]["w"])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)


class _Payload:
    """Unpickling this object calls os.makedirs: code execution from a checkpoint file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    marker = str(tmp_path / "code-ran")
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    torch.save({"method": {}, "step": 1, "evil": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path)
    assert not os.path.exists(marker)
    # the payload is real: a full unpickle would have run it
    torch.load(path, weights_only=False)
    assert os.path.isdir(marker)


# ---------------------------------------------------------------- exported backbone
@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    bb = create_model("resnet10_cifar", img_size=8).eval()
    card = {"model": "resnet10_cifar", "model_kwargs": {"img_size": 8}, "method": "simclr"}
    weights = export_backbone(bb, tmp_path, card)
    return bb, weights, tmp_path


def test_export_writes_weights_and_card(exported):
    bb, weights, run = exported
    assert weights == run / "backbone.safetensors"
    card = json.loads((run / "card.json").read_text())
    assert card["sha256"] == sha256(weights)
    assert card["model"] == "resnet10_cifar" and "created" in card
    assert sorted(os.listdir(run)) == ["backbone.safetensors", "card.json"]


def test_load_backbone_rebuilds_same_model(exported):
    bb, weights, run = exported
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        ref = bb.embed(x)
        for where in (run, weights, run / "card.json"):
            m = load_backbone(where).eval()
            torch.testing.assert_close(m.embed(x), ref, rtol=0, atol=0)


def test_tampered_weights_rejected(exported):
    _, weights, run = exported
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF                   # flip bits in the last tensor's data: still a valid file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_backbone(run)
    load_backbone(run, verify=False)   # the check, not the file format, refused it


def test_read_card_errors(tmp_path, exported):
    _, weights, run = exported
    assert read_card(run)[0] == weights
    with pytest.raises(FileNotFoundError, match="no backbone weights"):
        read_card(tmp_path / "nowhere")
    (run / "card.json").unlink()
    with pytest.raises(FileNotFoundError, match="card.json"):
        read_card(weights)
