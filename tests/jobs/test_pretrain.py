"""The pretraining job on the one trainer: what it records, and what it gained from the loop that
fine-tuning had first (layer-wise lr decay, a model EMA)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import keel
from keel.config import load_config
from keel.data.sources import build_dataset
from keel.engine.hooks import EMAHook, Hook
from keel.engine.optim import num_layers
from keel.engine.trainer import Trainer
from keel.jobs.pretrain import pretrain
from keel.models.registry import create_model, model_kwargs
from keel.tasks.ssl import build_method
from keel.tasks.ssl.simclr import SimCLR
from keel.tasks.ssl.swav import SwAV


def test_config_yaml_records_the_method_defaults_used(make_cfg, tmp_path):
    cfg = make_cfg("method.name=swav", "method.proj_dim=16", "train.max_steps=1")
    assert cfg.method.temperature is None and cfg.method.num_prototypes is None
    pretrain(cfg, tmp_path / "run", quiet=True)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]
    assert saved["temperature"] == SwAV.defaults["temperature"] == 0.1
    assert saved["num_prototypes"] == SwAV.defaults["num_prototypes"]
    assert saved["proj_dim"] == 16                                  # the user's value, not the default
    assert saved["proj_hidden_dim"] == 64
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["config"]["method"]["temperature"] == 0.1


def test_every_default_a_method_reads_is_declared(tiny_cfg):
    """A method's defaults dict is its own small config: each key it reads through opt() is there
    (or computed), and the values are what the method runs with."""
    backbone = create_model(tiny_cfg.model.name, **model_kwargs(tiny_cfg))
    m = build_method("simclr", backbone, tiny_cfg)
    assert m.used == {"temperature": 0.2, "proj_hidden_dim": 64, "proj_dim": 32}
    assert m.temperature == SimCLR.defaults["temperature"]


def test_layer_decay_is_honoured_in_pretraining(make_cfg, tmp_path):
    """train.layer_decay scales each backbone layer's lr (head and projector at the full lr), and
    the lr the optimizer steps with is lr x scale: pretraining no longer writes one lr to every group."""
    decay = 0.5
    cfg = make_cfg("train.layer_decay=0.5", "train.max_steps=2", "train.warmup_epochs=0")
    data = build_dataset(cfg.data.source, "train", cfg.data.img_size, subset=cfg.data.subset, seed=0)
    method = build_method("simclr", create_model(cfg.model.name, **model_kwargs(cfg)), cfg)
    L = num_layers(method.backbone)
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    seen = []

    class Record(Hook):
        def after_step(self, t):
            seen.append([(g["names"][0], g["lr"], g["lr_scale"]) for g in t.optimizer.param_groups])

    trainer.fit(method, data, [Record()])
    names = {n: (lr, scale) for n, lr, scale in seen[-1]}
    stem = next(v for n, v in names.items() if n.startswith("backbone.stem"))
    proj = next(v for n, v in names.items() if n.startswith("projector"))
    assert stem[1] == pytest.approx(decay ** (L + 1)) and proj[1] == 1.0
    base = proj[0]
    for lr, scale in names.values():
        assert lr == pytest.approx(base * scale, rel=1e-12)
    assert base > 0 and stem[0] == pytest.approx(base * decay ** (L + 1))


def test_pretraining_keeps_an_ema_when_asked(make_cfg, tmp_path):
    """train.model_ema: after k steps the exported EMA backbone is d^k w0 + (1 - d) sum d^(k-i) w_i,
    computed here from the weights after every step, and <run>/ema loads like any run."""
    d = 0.5
    cfg = make_cfg("train.model_ema=0.5", "train.max_steps=3")
    data = build_dataset(cfg.data.source, "train", cfg.data.img_size, subset=cfg.data.subset, seed=0)
    method = build_method("simclr", create_model(cfg.model.name, **model_kwargs(cfg)), cfg)
    ema = EMAHook(method.backbone, d)
    weights = []

    class Record(Hook):
        def before_train(self, t):
            weights.append({k: v.clone() for k, v in method.backbone.state_dict().items()})

        def after_step(self, t):
            weights.append({k: v.clone() for k, v in method.backbone.state_dict().items()})

    Trainer(cfg, tmp_path / "run", quiet=True).fit(method, data, [Record(), ema])
    got = ema.ema.state_dict()
    for key, value in got.items():
        if not value.is_floating_point():
            continue
        expect = weights[0][key] * d ** 3 + sum((1 - d) * d ** (3 - i) * weights[i][key] for i in range(1, 4))
        torch.testing.assert_close(value, expect, rtol=1e-5, atol=1e-6, msg=key)
    # and through the job: the EMA is exported as a run of its own
    pretrain(make_cfg("train.model_ema=0.9", "train.max_steps=2"), tmp_path / "job", quiet=True)
    ema_backbone = keel.load_backbone(tmp_path / "job" / "ema")
    own = load_file(tmp_path / "job" / "backbone.safetensors")
    assert any(not torch.equal(v, own[k]) for k, v in ema_backbone.state_dict().items() if v.is_floating_point())


def test_old_flat_finetune_keys_still_load_with_a_message(tmp_path, capsys):
    from keel.config import FinetuneConfig
    cfg = load_config(None, ["backbone=random:resnet10_cifar", "epochs=3", "distill=hard", "lr=0.01"],
                      cls=FinetuneConfig)
    assert (cfg.model.backbone, cfg.train.epochs, cfg.distill.kind, cfg.train.lr) == \
        ("random:resnet10_cifar", 3, "hard", 0.01)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deprecated" in err and "epochs -> train.epochs" in err
