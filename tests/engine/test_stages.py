"""Staged training: per-stage configs, carrying weights and optimizer state across stages, and
resuming a staged run in the middle of a stage."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import keel
from keel.config import ConfigError, load_config
from keel.engine.optim import build_optimizer
from keel.jobs.pretrain import pretrain
from keel.engine.stages import carry_over, joined_history, stage_configs
from keel.tasks.ssl import build_method

TWO_STAGES = "stages=[{train: {epochs: 1}, data: {img_size: 8}, method: {proj_dim: 16}}, {train: {epochs: 1}, data: {img_size: 12}}]"


def test_stage_configs_merge_each_stage_over_the_base(make_cfg):
    cfg = make_cfg(TWO_STAGES, "train.seed=7")
    s1, s2 = stage_configs(cfg)
    assert (s1.data.img_size, s1.method.proj_dim, s1.train.epochs) == (8, 16, 1)
    assert (s2.data.img_size, s2.method.proj_dim) == (12, 32)  # the base config's proj_dim
    assert s1.stages == [] and s2.stages == []
    assert (s1.train.seed, s2.train.seed) == (7, 1007)  # distinct random streams per stage
    assert stage_configs(make_cfg()) == [make_cfg()]    # no stages: the config itself


@pytest.mark.parametrize("stages, message", [
    ("[{train: {epoch: 1}}]", r"stages\[1\]: unknown config key 'train.epoch'"),
    ("[{train: {epochs: 1}}, {model: {name: vit_tiny_patch4_32}}]", r"stages\[2\] changes model.name"),
    ("[3]", r"stages\[1\] must be a mapping"),
])
def test_bad_stages_fail_with_the_stage_named(make_cfg, stages, message):
    with pytest.raises(ConfigError, match=message):
        stage_configs(make_cfg(f"stages={stages}"))


def test_carry_over_moves_matching_weights_and_adam_state(make_cfg):
    torch.manual_seed(0)
    cfg_a = make_cfg("method.proj_dim=16")
    a = build_method("simclr", keel.create_model("resnet10_cifar"), cfg_a)
    opt_a = build_optimizer("adamw", a, 1e-3, 1e-4)
    a(a.make_views(torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8), None))["loss"].backward()
    opt_a.step()
    state = {"method": a.state_dict(), "optimizer": opt_a.state_dict()}

    b = build_method("simclr", keel.create_model("resnet10_cifar"), make_cfg("method.proj_dim=24"))
    opt_b = build_optimizer("adamw", b, 5e-4, 1e-4)
    moved = carry_over(b, opt_b, state)
    last = "projector.net.3.weight"  # the output layer: 16 -> 24 wide, so it starts fresh
    assert last in moved["fresh"] and "backbone.stem.0.weight" in moved["carried"]
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    torch.testing.assert_close(params_b["backbone.stem.0.weight"], params_a["backbone.stem.0.weight"])
    assert not torch.equal(params_b[last][:16], params_a[last])
    st_a, st_b = opt_a.state, opt_b.state
    torch.testing.assert_close(st_b[params_b["backbone.stem.0.weight"]]["exp_avg"],
                               st_a[params_a["backbone.stem.0.weight"]]["exp_avg"])
    assert params_b[last] not in st_b  # no Adam moments for the fresh layer
    assert opt_b.param_groups[0]["lr"] == 5e-4  # the new stage keeps its own hyper-parameters


def test_second_stage_starts_from_first_stage_weights(make_cfg, tmp_path):
    # Stage 2 with lr 0 changes no weight: its exported convolutions equal stage 1's.
    cfg = make_cfg("stages=[{train: {epochs: 1}}, {train: {epochs: 1, lr: 0.0, warmup_epochs: 0}}]")
    result = pretrain(cfg, tmp_path / "run", quiet=True)
    s1 = load_file(tmp_path / "run" / "stage1" / "backbone.safetensors")
    s2 = load_file(tmp_path / "run" / "stage2" / "backbone.safetensors")
    final = load_file(tmp_path / "run" / "backbone.safetensors")
    convs = [k for k in s1 if k.endswith("conv1.weight") or k.endswith("stem.0.weight")]
    assert convs
    for k in convs:
        torch.testing.assert_close(s2[k], s1[k], rtol=0, atol=0)
    assert all(torch.equal(final[k], s2[k]) for k in s2)
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert [s["steps"] for s in card["stages"]] == [4, 4] and result["stages"][1]["steps"] == 4
    assert load_config(tmp_path / "run" / "config.yaml").stages == cfg.stages
    steps = [s for s, _ in joined_history([tmp_path / "run" / "stage1", tmp_path / "run" / "stage2"])["loss"]]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # stage 2's steps follow stage 1's
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_resume_in_the_middle_of_a_stage_equals_an_unbroken_run(make_cfg, tmp_path):
    full = make_cfg(TWO_STAGES)
    pretrain(full, tmp_path / "unbroken", quiet=True)
    cut = make_cfg("stages=[{train: {epochs: 1}, data: {img_size: 8}, method: {proj_dim: 16}}, "
                   "{train: {epochs: 1, max_steps: 2}, data: {img_size: 12}}]")
    pretrain(cut, tmp_path / "broken", quiet=True)
    assert not json.loads((tmp_path / "broken" / "stage2" / "card.json").read_text())["finished"]
    pretrain(full, tmp_path / "broken", resume=True, quiet=True)  # stage 1 is skipped, stage 2 resumed
    a = load_file(tmp_path / "unbroken" / "backbone.safetensors")
    b = load_file(tmp_path / "broken" / "backbone.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
