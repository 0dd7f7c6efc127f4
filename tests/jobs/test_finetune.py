"""keel.jobs.finetune: metrics by hand, freezing by mode (bit-identical frozen parts), learning
on digits, seeding, the lr wiring (schedules, layer decay), artifacts, image folders, loading."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import keel.engine.hooks as hooks
import keel.engine.trainer as trainer
import keel.jobs.finetune as ft
from keel import hub
from keel.config import ConfigError, FinetuneConfig, load_config, override, to_dict
from keel.data.sources import ImageFolder, build_dataset
from keel.jobs.finetune import finetune
from keel.models.layers.drop import DropPath
from keel.models.registry import create_model
from keel.recipes.supervised import DEFAULT_WEIGHT_DECAY, apply_recipe
from keel.tasks.classify import ClassificationTask, set_drop_path


@pytest.fixture(scope="module")
def digits8():
    return build_dataset("digits", "train", 8, labeled=True), build_dataset("digits", "test", 8, labeled=True)


def _cfg(values: dict | None = None) -> FinetuneConfig:
    """The tiny fine-tuning config with ``{"section.key": value}`` on top."""
    base = {"data.img_size": 8, "train.epochs": 1, "train.batch_size": 64, "train.warmup_epochs": 0.0,
            "train.device": "cpu", "model.drop_path_rate": 0.0, "task.label_smoothing": 0.0, "data.num_workers": 0}
    return override(FinetuneConfig(), {**base, **(values or {})})


def _resnet(seed=0):
    return hub.resolve_backbone("random:resnet10_cifar", 8, seed=seed)[0]


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _initial_head(backbone, num_classes, cfg) -> nn.Module:
    """The head ``finetune`` starts from: it seeds with train.seed right before building it."""
    torch.manual_seed(cfg.train.seed)
    return ClassificationTask(num_classes).head(backbone.num_features)


def _flat(cfg) -> dict:
    """``{"section.key": value}`` of every key of a sectioned config."""
    return {f"{s}.{k}": v for s, keys in to_dict(cfg).items() for k, v in keys.items()}


def test_classification_task_metrics_against_a_hand_count():
    task = ClassificationTask(6, label_smoothing=0.1)
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1 hit
        [0.0, 0.1, 0.9, 0.3, 0.2, 0.4],   # label 5: 2nd of 6 -> top-5 hit
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],   # label 5: last -> miss in both
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # label 1: 5th -> top-5 hit
    ])
    labels = torch.tensor([0, 5, 5, 1])
    assert task.metrics(scores, labels) == pytest.approx({"top1": 25.0, "top5": 75.0})
    assert task.main_metric == "top1"
    head = task.head(7)
    # timm's fine-tuning head: nn.Linear's weights, U(+-1/sqrt(7)), and a zero bias
    assert isinstance(head, nn.Linear) and head.out_features == 6
    assert 0.1 < head.weight.abs().max() <= 7 ** -0.5 and torch.equal(head.bias, torch.zeros(6))
    expected = nn.functional.cross_entropy(scores, labels, label_smoothing=0.1)
    torch.testing.assert_close(task.loss(scores, labels), expected)


def test_full_finetune_learns_digits_and_writes_its_artifacts(digits8, tmp_path):
    train, test = digits8
    cfg = _cfg({"train.epochs": 3, "train.lr": 3e-2, "train.warmup_epochs": 0.5})
    res = finetune(_resnet(), train, test, cfg, run_dir=tmp_path / "run", progress=False)
    assert res["final"]["top1"] > 50.0            # chance is 10%
    assert res["best"]["top1"] >= res["final"]["top1"] and res["main_metric"] == "top1"
    assert res["steps"] == 3 * 23                 # ceil(1437 / 64) near-equal batches per epoch
    assert res["trainable_params"] == sum(p.numel() for p in res["classifier"].parameters())

    run = tmp_path / "run"
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "top1" in r]        # one evaluation line per epoch
    trains = [r for r in lines if "loss" in r]       # training lines: every 50 steps and each epoch's end
    assert [r["epoch"] for r in evals] == [1, 2, 3] and [r["step"] for r in evals] == [23, 46, 69]
    assert all("top5" in r and "loss" not in r for r in evals)
    assert [r["step"] for r in trains] == [23, 46, 50, 69] and all("lr" in r and "top1" not in r for r in trains)
    assert evals[-1]["top1"] == res["final"]["top1"]
    assert max(r["top1"] for r in evals) == res["best"]["top1"]
    # config.yaml holds the values used: the optimizer's default weight decay filled in
    assert load_config(run / "config.yaml", cls=FinetuneConfig) == \
        override(cfg, {"train.weight_decay": DEFAULT_WEIGHT_DECAY["adamw"]})
    saved = json.loads((run / "result.json").read_text())
    assert saved["final"] == res["final"] and saved["best"] == res["best"]
    last = load_file(run / "classifier.safetensors")
    assert set(last) == set(res["classifier"].state_dict())
    assert {k.split(".")[0] for k in last} == {"backbone", "head"}
    torch.testing.assert_close(last["head.weight"], res["classifier"].head.weight.detach())
    assert (run / "classifier_best.safetensors").is_file() and (run / "curves.png").is_file()


def test_partial_mode_trains_only_the_last_blocks_and_the_head(digits8):
    train, test = digits8
    small = train.subset(torch.arange(256))
    backbone = _resnet()
    before = _state(backbone)
    cfg = _cfg({"task.mode": "partial", "task.partial_blocks": 1, "train.lr": 1e-2})
    res = finetune(backbone, small, test, cfg, progress=False)
    after = backbone.state_dict()
    for k, v in after.items():
        if k.startswith("stages.3."):        # the last block: weights and BN statistics move
            if not k.endswith("num_batches_tracked"):
                assert not torch.equal(v, before[k]), k
        else:                                 # stem and stages 0-2: weights AND BN buffers untouched
            assert torch.equal(v, before[k]), k
    assert not torch.equal(res["classifier"].head.weight, _initial_head(backbone, 10, cfg).weight)  # it trained
    assert all(p.requires_grad for p in backbone.parameters())    # flags restored afterwards


def test_linear_mode_trains_only_the_head(digits8):
    train, test = digits8
    small = train.subset(torch.arange(256))
    backbone = _resnet()
    before = _state(backbone)
    cfg = _cfg({"task.mode": "linear", "train.epochs": 2, "train.lr": 1e-2})
    res = finetune(backbone, small, test, cfg, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    clf = res["classifier"]
    assert not torch.equal(clf.head.weight, _initial_head(backbone, 10, cfg).weight)  # it trained
    assert clf.feature_norm.num_batches_tracked.item() == res["steps"]  # MAE's BN before the head
    assert res["trainable_params"] == clf.head.weight.numel() + clf.head.bias.numel()


def test_same_seed_same_run_and_another_seed_differs(digits8):
    train, test = digits8
    small = train.subset(torch.arange(128))

    def run(seed):
        torch.manual_seed(123)   # the backbone is built outside: same weights every time
        vit = create_model("vit_tiny_patch4_32", img_size=8, patch_size=2, depth=2, dim=24, num_heads=2)
        res = finetune(vit, small, test, _cfg({"model.drop_path_rate": 0.2, "train.seed": seed, "train.lr": 1e-2,
                                               "train.batch_size": 32}), progress=False)
        return res["final"], _state(res["classifier"])

    (m1, s1), (m2, s2), (_, s3) = run(0), run(0), run(1)
    assert m1 == m2 and all(torch.equal(v, s2[k]) for k, v in s1.items())
    assert not all(torch.equal(v, s3[k]) for k, v in s1.items())


def test_step_schedule_and_layer_decay_reach_the_optimizer(digits8, monkeypatch):
    train, test = digits8
    small = train.subset(torch.arange(128))
    seen = []

    def spy(optimizer, lr):
        ft_apply(optimizer, lr)
        seen.append((lr, [(g["layer_id"], g["lr"]) for g in optimizer.param_groups]))

    ft_apply = trainer.apply_lr
    monkeypatch.setattr(trainer, "apply_lr", spy)
    cfg = _cfg({"task.mode": "full", "train.epochs": 4, "train.batch_size": 64, "train.lr": 0.256,
                "train.schedule": "step", "train.milestones": [0.5, 0.75], "train.layer_decay": 0.5,
                "train.optimizer": "sgd"})
    finetune(_resnet(), small, test, cfg, progress=False)
    base = 0.256 * 64 / 256                     # lr scaled by batch / 256
    lrs = [lr for lr, _ in seen]                # 2 steps per epoch, 8 steps: drops at steps 4 and 6
    assert lrs == pytest.approx([base] * 4 + [base * 0.1] * 2 + [base * 0.01] * 2)
    for lr, groups in seen:                     # resnet10: 4 blocks, head at id 5
        assert {i for i, _ in groups} == {0, 1, 2, 3, 4, 5}
        for i, group_lr in groups:
            assert group_lr == pytest.approx(lr * 0.5 ** (5 - i))


def test_image_folder_datasets_through_a_dataloader(tmp_path):
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c, value in (("dark", 40), ("light", 215)):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(6):
                px = (value + torch.randint(-30, 30, (8, 8, 3), generator=gen)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(px.numpy()).save(d / f"{i}.png")
    (tmp_path / "train" / "dark" / "broken.png").write_bytes(b"not a png")   # skipped, not fatal
    train = ImageFolder(tmp_path / "train", img_size=8, labeled=True)
    test = ImageFolder(tmp_path / "test", img_size=8, labeled=True)
    cfg = _cfg({"train.epochs": 4, "train.batch_size": 4, "train.lr": 2e-2})
    res = finetune(_resnet(), train, test, cfg, progress=False)
    assert res["train_images"] == 13 and res["test_images"] == 12
    assert res["final"]["top1"] == 100.0       # dark vs light: trivially separable


def test_resolve_backbone_specs(tmp_path):
    def load(spec, size, seed=0):
        model, built_at = hub.resolve_backbone(spec, size, seed=seed)
        assert built_at == size
        return model

    # random: seeded
    a, b = load("random:resnet10_cifar", 8, seed=3), load("random:resnet10_cifar", 8, seed=3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    # a keel run directory; at another image size a ViT's position table is resampled
    from keel.engine.checkpoint import export_backbone
    vit = create_model("vit_tiny_patch4_32", img_size=16, depth=1, dim=24, num_heads=2)
    kwargs = {"img_size": 16, "depth": 1, "dim": 24, "num_heads": 2}
    export_backbone(vit, tmp_path / "run", {"model": "vit_tiny_patch4_32", "model_kwargs": kwargs})
    same = load(str(tmp_path / "run"), 16)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in vit.state_dict().items())
    small = load(str(tmp_path / "run" / "backbone.safetensors"), 8)
    assert small.pos_embed.shape == (1, 1 + 4, 24)
    torch.testing.assert_close(small.pos_embed[:, 0], vit.pos_embed[:, 0])          # class token entry kept
    torch.testing.assert_close(small.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)

    # timm: a real timm model's state dict, as .pth (nested under "model") and .safetensors, by
    # keel's or timm's name; the ImageNet head is dropped; features equal timm's
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    torch.manual_seed(0)
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=7).eval()
    torch.save({"model": tm.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = tm.forward_head(tm.forward_features(x), pre_logits=True)
        for spec in (f"timm:vit_tiny_patch16:{tmp_path / 'w.pth'}",
                     f"timm:vit_tiny_patch16_224:{tmp_path / 'w.safetensors'}"):
            m = load(spec, 32).eval()
            assert isinstance(m.head, nn.Identity)
            torch.testing.assert_close(m.embed(x), want, rtol=1e-4, atol=1e-5)
        assert load(f"timm:vit_tiny_patch16:{tmp_path / 'w.pth'}", 48).pos_embed.shape == (1, 10, 192)
    with pytest.raises(ValueError, match="timm:<model name>:<path"):
        hub.resolve_backbone("timm:vit_tiny_patch16", 32)


@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch4_32", dict(img_size=16, depth=3, dim=24, num_heads=2)),
    ("swin_tiny", dict(embed_dim=8, depths=(1, 2, 2), num_heads=(1, 1, 1), window_size=2)),
    ("keel_tiny", dict(img_size=32, widths=(8, 16, 32, 64), depths=(1, 2, 2, 1))),
    ("resnet10_cifar", {}),
])
def test_set_drop_path_matches_the_rates_models_are_built_with(name, kw):
    def rates(model):
        return {n: m.p for n, m in model.named_modules() if isinstance(m, DropPath)}

    built = create_model(name, drop_path_rate=0.3, **kw)
    later = create_model(name, **kw)
    set_drop_path(later, 0.3)
    assert rates(later) == pytest.approx(rates(built)) and max(rates(built).values()) == pytest.approx(0.3)


# ---------------------------------------------------------------------------------- DeiT recipe, EMA
DEIT = {"train.optimizer": "adamw", "train.weight_decay": 0.05, "train.schedule": "cosine",
        "train.warmup_epochs": 5.0, "task.label_smoothing": 0.1, "aug.randaugment": "rand-m9-mstd0.5-inc1",
        "aug.mixup": 0.8, "aug.cutmix": 1.0, "aug.mix_switch_prob": 0.5, "aug.reprob": 0.25,
        "model.drop_path_rate": 0.1, "train.repeated_aug": 3}


def test_deit_recipe_fills_exactly_the_deit_values(capsys):
    cfg = apply_recipe(override(FinetuneConfig(), {"recipe.name": "deit", "train.batch_size": 512}))
    got = _flat(cfg)
    for key, value in DEIT.items():
        assert got[key] == value, key
    assert cfg.train.lr * cfg.train.batch_size / 256 == pytest.approx(5e-4 * 512 / 512)   # DeiT: 5e-4 x batch / 512
    assert cfg.train.model_ema == 0.0 and cfg.distill.kind == "none" and cfg.train.epochs == 50  # left alone
    default = _flat(FinetuneConfig())
    untouched = set(default) - set(DEIT) - {"recipe.name", "train.lr", "train.batch_size"}
    assert all(got[k] == default[k] for k in untouched)
    printed = capsys.readouterr().out
    assert "recipe deit: set train.lr=0.00025" in printed and "aug.mixup=0.8" in printed \
        and "train.repeated_aug=3" in printed
    assert apply_recipe(cfg, verbose=False) == cfg                           # applying twice: no change

    # what the user set is kept; another optimizer keeps its own lr and weight decay
    mine = apply_recipe(override(FinetuneConfig(), {"recipe.name": "deit", "aug.mixup": 0.2, "train.lr": 1e-3,
                                                    "aug.reprob": 0.0 + 0.1}), verbose=False)
    assert (mine.aug.mixup, mine.train.lr, mine.aug.reprob, mine.aug.cutmix) == (0.2, 1e-3, 0.1, 1.0)
    sgd = apply_recipe(override(FinetuneConfig(), {"recipe.name": "deit", "train.optimizer": "sgd"}), verbose=False)
    assert sgd.train.optimizer == "sgd" and sgd.train.lr is None and sgd.train.weight_decay is None \
        and sgd.aug.mixup == 0.8
    assert apply_recipe(FinetuneConfig()) == FinetuneConfig()
    with pytest.raises(ConfigError, match="recipe.name must be"):
        apply_recipe(override(FinetuneConfig(), {"recipe.name": "beit"}))


@pytest.mark.parametrize("kw,match", [
    ({"distill.kind": "medium"}, "distill.kind must be"), ({"aug.randaugment": "rand-m9-x3"}, "unknown part"),
    ({"aug.mixup": -1.0}, "Beta alphas"), ({"aug.reprob": 1.5}, "reprob"), ({"train.model_ema": 1.0}, "model_ema"),
    ({"train.repeated_aug": 0}, "repeated_aug"), ({"train.repeated_aug": 65}, "repeated_aug"),
    ({"distill.teacher": "random:resnet10_cifar"}, "distill.kind=none"), ({"distill.tau": 0.0}, "distill.tau"),
    ({"data.exclude": "drop.txt"}, "data.exclude is for pretraining"),
])
def test_recipe_and_distillation_keys_are_checked(kw, match):
    with pytest.raises(ConfigError, match=match):
        ft.check(_cfg(kw))


def test_distillation_without_a_teacher_or_with_another_task_is_refused(digits8):
    train, test = digits8
    with pytest.raises(ConfigError, match="needs a teacher"):
        finetune(_resnet(), train, test, _cfg({"distill.kind": "hard"}), progress=False)

    from keel.evaluate.multilabel import MultiLabelTask
    with pytest.raises(ConfigError, match="single-label classification"):
        finetune(_resnet(), train, test, _cfg({"aug.mixup": 0.8}), task=MultiLabelTask(10), progress=False)


def test_update_ema_is_the_formula_after_two_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = copy.deepcopy(model)
    w0 = _state(model)
    states = []
    for _ in range(2):                               # two "steps": new weights and BN statistics
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))
        states.append(_state(model))
        hooks.update_ema(ema, model, 0.9)
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            want = 0.81 * w0[k] + 0.9 * 0.1 * states[0][k] + 0.1 * states[1][k]
            torch.testing.assert_close(v, want)
        else:                                        # BatchNorm's step count is copied
            assert torch.equal(v, states[1][k])


def test_model_ema_in_finetune_equals_the_formula_and_is_evaluated(digits8, monkeypatch, tmp_path):
    train, test = digits8
    small = train.subset(torch.arange(96))
    recorded = []
    real = hooks.update_ema

    def spy(ema, model, decay):
        recorded.append(_state(model))
        real(ema, model, decay)

    monkeypatch.setattr(hooks, "update_ema", spy)
    torch.manual_seed(5)
    vit = create_model("vit_tiny_patch4_32", img_size=8, patch_size=2, depth=2, dim=24, num_heads=2)
    start = {f"backbone.{k}": v.clone() for k, v in vit.state_dict().items()}
    res = finetune(vit, small, test, _cfg({"train.model_ema": 0.7, "train.lr": 1e-2, "train.batch_size": 48}),
                   run_dir=tmp_path / "r", progress=False)
    assert len(recorded) == res["steps"] == 2
    torch.manual_seed(0)                             # the head as finetune initialises it (seed 0)
    start.update({f"head.{k}": v for k, v in ClassificationTask(10).head(24).state_dict().items()})
    ema = res["ema_classifier"].state_dict()
    assert set(ema) == set(start)
    for k, v in ema.items():                         # EMA started at the initial model, decay 0.7
        torch.testing.assert_close(v, 0.49 * start[k] + 0.7 * 0.3 * recorded[0][k] + 0.3 * recorded[1][k])
    assert not torch.equal(ema["backbone.pos_embed"], res["classifier"].state_dict()["backbone.pos_embed"])
    assert {"ema_top1", "ema_top5"} <= set(res["final"]) and res["best_ema"]["epoch"] == 1
    saved = load_file(tmp_path / "r" / "classifier_ema.safetensors")
    torch.testing.assert_close(saved["head.weight"], ema["head.weight"])


def test_repeated_augmentation_keeps_the_epoch_length(digits8, monkeypatch):
    train, test = digits8
    small = train.subset(torch.arange(128))
    seen = []
    real = trainer.load_batches

    def spy(ds, index_batches, *args, **kwargs):      # the trainer's training batches (not evaluation's)
        index_batches = list(index_batches)
        seen.append(index_batches)
        return real(ds, index_batches, *args, **kwargs)

    monkeypatch.setattr(trainer, "load_batches", spy)
    res = finetune(_resnet(), small, test, _cfg({"train.repeated_aug": 4, "train.batch_size": 32, "train.lr": 1e-2}),
                   progress=False)
    assert res["steps"] == 4
    epoch = seen[0]
    assert sum(len(b) for b in epoch) == 128 and len(torch.cat(epoch).unique()) == 32
    assert all(torch.all(b.unique(return_counts=True)[1] == 4) for b in epoch)


# ---------------------------------------------------------------------------------- BiT upstream, CSV tasks
def test_bit_upstream_recipe_is_bits_from_scratch_training(capsys):
    cfg = apply_recipe(override(FinetuneConfig(), {"recipe.name": "bit-upstream", "train.batch_size": 512}))
    t = cfg.train
    assert (t.optimizer, t.momentum, t.weight_decay, t.schedule) == ("sgd", 0.9, 1e-4, "step")
    assert t.lr * t.batch_size / 256 == pytest.approx(0.03 * 512 / 256)   # BiT: 0.03 x batch / 256
    assert [m * 90 for m in t.milestones] == pytest.approx([30, 60, 80])    # of BiT's 90 epochs
    assert cfg.task.label_smoothing == 0.0 and cfg.model.drop_path_rate == 0.0 and cfg.aug.mixup == 0.0
    assert "recipe bit-upstream: set train.optimizer='sgd'" in capsys.readouterr().out
    # a user's lr is kept
    mine = override(FinetuneConfig(), {"recipe.name": "bit-upstream", "train.lr": 0.1})
    assert apply_recipe(mine, verbose=False).train.lr == 0.1


def _tiny_train(digits8, n=64):
    train, _ = digits8
    return train.subset(torch.arange(n)) if hasattr(train, "subset") else train


def test_a_finetune_run_is_a_backbone_for_the_next_finetune(digits8, tmp_path):
    # BiT's chain: upstream training (a finetune run) -> its backbone fine-tuned downstream
    train, test = digits8
    cfg = _cfg({"model.backbone": "random:resnet10_cifar", "recipe.name": "bit-upstream"})
    finetune(_resnet(), train, test, cfg, run_dir=tmp_path / "up", progress=False)
    saved = load_file(str(tmp_path / "up" / "classifier.safetensors"))
    for spec in (tmp_path / "up", tmp_path / "up" / "classifier.safetensors"):
        model, _ = hub.resolve_backbone(str(spec), 8)
        own = model.state_dict()
        assert set(own) == {k[len("backbone."):] for k in saved if k.startswith("backbone.")}
        assert all(torch.equal(own[k[len("backbone."):]], v) for k, v in saved.items() if k.startswith("backbone."))
        assert isinstance(getattr(model, "head", nn.Identity()), nn.Identity)

    # a ViT fine-tuned at 8 px, taken on at 16 px: the position table is resampled, the rest kept
    vcfg = _cfg({"model.backbone": "random:vit_tiny_patch4_32"})
    small = train.subset(torch.arange(64))
    finetune(hub.resolve_backbone(vcfg.model.backbone, 8)[0], small, small, vcfg, run_dir=tmp_path / "vit",
             progress=False)
    vsaved = load_file(str(tmp_path / "vit" / "classifier.safetensors"))
    big, _ = hub.resolve_backbone(str(tmp_path / "vit"), 16)
    assert big.pos_embed.shape == (1, 1 + 16, 192)
    torch.testing.assert_close(big.pos_embed[:, 0], vsaved["backbone.pos_embed"][:, 0])
    assert torch.equal(big.blocks[-1].mlp.fc2.weight, vsaved[f"backbone.blocks.{len(big.blocks) - 1}.mlp.fc2.weight"])


def _digit_pngs(folder, n):
    from PIL import Image
    ds = build_dataset("digits", "train", 8, labeled=True)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{i:03d}.png"
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(folder / name)
        names.append((name, int(ds.labels[i])))
    return names


def test_a_multilabel_csv_source_fine_tunes_with_its_task(tmp_path):
    rows = _digit_pngs(tmp_path / "img", 60)
    lines = ["image,labels"] + [f"img/{n},d{d};{'big' if d >= 5 else 'small'}" for n, d in rows]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    cfg = _cfg({"model.backbone": "random:resnet10_cifar", "data.source": str(tmp_path / "labels.csv"),
                "task.multilabel_loss": "asl", "task.threshold": 0.3})
    train, test, task = ft.labeled_data(cfg)
    assert (len(train), len(test)) == (48, 12)                 # every 5th row held out
    assert task.loss_name == "asl" and task.threshold == 0.3 and task.num_classes == 12
    assert "big" in task.class_names and "d7" in task.class_names
    res = ft.run_finetune(cfg, run_dir=tmp_path / "run", progress=False)
    assert res["main_metric"] == "mAP" and (res["train_images"], res["test_images"]) == (48, 12)
    assert "ap/big" in res["final"] and "micro_f1" in res["final"]


def test_a_two_level_csv_with_its_own_test_file_shares_the_class_index(tmp_path):
    rows = _digit_pngs(tmp_path / "img", 30)
    kind = lambda d: "big" if d >= 5 else "small"   # noqa: E731
    train_lines = ["image,primary,secondary"] + [f"img/{n},{kind(d)},d{d}" for n, d in rows]
    # the test file (here rows the training file also has) names its columns and classes in another order
    test_lines = ["secondary,image,primary"] + [f"d{d},img/{n},{kind(d)}" for n, d in reversed(rows[20:])]
    (tmp_path / "train.csv").write_text("\n".join(train_lines) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(test_lines) + "\n")
    cfg = _cfg({"model.backbone": "random:resnet10_cifar", "data.source": str(tmp_path / "train.csv"),
                "data.test_source": str(tmp_path / "test.csv"), "task.mode": "linear"})
    train, test, task = ft.labeled_data(cfg)
    assert test.primary_classes == train.primary_classes and test.secondary_classes == train.secondary_classes
    d = int(rows[-1][1])
    assert test.labels[0].tolist() == [train.primary_classes.index(kind(d)), train.secondary_classes.index(f"d{d}")]
    assert task.main_metric == "both_top1" and task.mask is not None
    res = ft.run_finetune(cfg, progress=False, run_dir=tmp_path / "run")
    assert res["test_images"] == 10 and res["final"]["both_top1"] == res["final"]["secondary_top1"]

    (tmp_path / "ml.csv").write_text("image,labels\nimg/000.png,a\n")
    from keel.data.sources import DataError
    with pytest.raises(DataError, match="different kinds of label file"):
        ft.labeled_data(override(cfg, {"data.test_source": str(tmp_path / "ml.csv")}))
    # labeled_data no longer checks the config itself: the check comes first in run_finetune
    not_csv = override(cfg, {"data.source": "digits"})
    with pytest.raises(ConfigError, match="test_source is for a CSV"):
        ft.check(not_csv)
    with pytest.raises(ConfigError, match="test_source is for a CSV"):
        ft.run_finetune(not_csv, run_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_default_run_dir_names_the_backbone_and_the_data():
    cfg = override(FinetuneConfig(), {"model.backbone": "runs/simclr-x/", "data.source": "/data/tags.csv",
                                      "task.mode": "linear"})
    assert ft.default_run_dir(cfg).name.startswith("finetune-linear-simclr-x-tags-")
    cfg = override(FinetuneConfig(), {"model.backbone": "random:resnet10_cifar", "data.source": "digits"})
    name = ft.default_run_dir(cfg).name
    assert name.startswith("finetune-full-resnet10_cifar-digits-")
