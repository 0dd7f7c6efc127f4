"""keel.config: defaults < sub-command defaults < YAML file < overrides, strict keys and types."""
from __future__ import annotations

import pytest
import yaml

from keel.config import ConfigError, RunConfig, load_config, parse_overrides, save_config, to_dict


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_file_or_overrides():
    assert load_config() == RunConfig()


def test_precedence_defaults_yaml_overrides(tmp_path):
    f = _write(tmp_path / "run.yaml", {"train": {"epochs": 7, "lr": 0.5}, "model": {"name": "vit_tiny_patch4_32"}})
    cfg = load_config(f, ["train.epochs=3"], defaults={"train": {"epochs": 99, "batch_size": 32, "lr": 9.0}})
    assert cfg.train.epochs == 3              # override beats the file
    assert cfg.train.lr == 0.5                # the file beats the sub-command defaults
    assert cfg.train.batch_size == 32         # sub-command defaults beat the dataclass defaults
    assert cfg.model.name == "vit_tiny_patch4_32"
    assert cfg.train.seed == RunConfig().train.seed   # untouched keys keep their defaults
    # merging is per key, not per section: the file's train section did not erase the others
    assert cfg.train.optimizer == RunConfig().train.optimizer


def test_overrides_are_yaml_typed():
    assert parse_overrides(["train.epochs=5", "data.source=my/dir", "train.compile=true", "run=", "a.b.c=1.5"]) == {
        "train": {"epochs": 5, "compile": True}, "data": {"source": "my/dir"}, "run": "", "a": {"b": {"c": 1.5}}}


def test_int_for_float_is_accepted_and_becomes_float():
    cfg = load_config(None, ["train.lr=1", "train.warmup_epochs=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert isinstance(cfg.train.warmup_epochs, float)


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 (PyYAML) reads "1e-3" as a string; a float field must still take it
    assert load_config(None, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_exponent_in_yaml_file_is_a_float(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 3e-4\n  min_lr: 1e-6\n")
    cfg = load_config(f)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.min_lr == pytest.approx(1e-6)


def test_integral_float_for_int_ok_fractional_not():
    assert load_config(None, ["train.epochs=4.0"]).train.epochs == 4
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=4.5"])


@pytest.mark.parametrize("item, key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.lr=fast", "train.lr"),
    ("train.compile=maybe", "train.compile"),
    ("train.epochs=true", "train.epochs"),       # a bool is not an int
    ("data.source=[a, b]", "data.source"),
    ("eval.knn_k=[5, x]", "eval.knn_k"),
])
def test_bad_types_name_the_key(item, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_bool_spellings():
    assert load_config(None, ["train.compile=yes"]).train.compile is True
    assert load_config(None, ["train.compile=0"]).train.compile is False
    assert load_config(None, ["train.channels_last=False"]).train.channels_last is False


@pytest.mark.parametrize("item, name", [
    ("train.epoch=3", "train.epoch"),
    ("trian.epochs=3", "trian"),
    ("model.depth=12", "model.depth"),
])
def test_unknown_key_is_named(item, name):
    with pytest.raises(ConfigError, match=f"unknown config key '{name}'"):
        load_config(None, [item])


def test_unknown_key_in_yaml_file(tmp_path):
    f = _write(tmp_path / "c.yaml", {"data": {"sorce": "x"}})
    with pytest.raises(ConfigError, match="data.sorce"):
        load_config(f)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs"])


def test_section_set_to_a_scalar():
    with pytest.raises(ConfigError, match=r"^train: expected a mapping"):
        load_config(None, ["train=5"])
    # a scalar section followed by one of its keys is a config error, not a TypeError
    with pytest.raises(ConfigError, match="train"):
        load_config(None, ["train=5", "train.epochs=3"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- train\n- data\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == RunConfig()


def test_list_field():
    assert load_config(None, ["eval.knn_k=[5,10]"]).eval.knn_k == [5, 10]
    assert load_config(None, ["eval.knn_k=7"]).eval.knn_k == [7]     # a scalar becomes a one-item list
    assert load_config(None, ["eval.knn_k=[5.0]"]).eval.knn_k == [5]
    # the default list is not shared between instances
    a, b = RunConfig(), RunConfig()
    a.eval.knn_k.append(1)
    assert b.eval.knn_k == [20, 200]


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["eval.knn_k=[5,10]", "train.lr=0.25", "data.source=some/folder", "train.compile=true",
                             "train.run_name=x y", "aug.blur_p=0.5", "train.epochs=2"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    back = load_config(path)
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    # the saved file is plain YAML with every section
    assert set(yaml.safe_load(path.read_text())) == {"data", "model", "method", "aug", "train", "eval", "stages"}


def test_string_field_keeps_numbers_as_text():
    # a run name or folder that YAML reads as a number must come back as a string
    cfg = load_config(None, ["train.run_name=2024", "data.source=123"])
    assert cfg.train.run_name == "2024" and cfg.data.source == "123"
