"""keel.evaluate.finetune: metrics by hand, freezing by mode (bit-identical frozen parts), learning
on digits, seeding, the lr wiring (schedules, layer decay), artifacts, image folders, loading."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import keel.evaluate.finetune as ft
from keel.config import load_config
from keel.data.sources import ImageFolder, build_dataset
from keel.evaluate.finetune import ClassificationTask, FinetuneConfig, finetune, load_for_finetune
from keel.models.registry import create_model


@pytest.fixture(scope="module")
def digits8():
    return build_dataset("digits", "train", 8, labeled=True), build_dataset("digits", "test", 8, labeled=True)


def _cfg(**kw):
    base = dict(img_size=8, epochs=1, batch_size=64, warmup_epochs=0.0, device="cpu", drop_path_rate=0.0,
                label_smoothing=0.0, num_workers=0)
    return FinetuneConfig(**{**base, **kw})


def _resnet(seed=0):
    return load_for_finetune("random:resnet10_cifar", 8, seed=seed)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


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
    assert isinstance(head, nn.Linear) and head.out_features == 6 and head.weight.abs().max() < 1e-4
    expected = nn.functional.cross_entropy(scores, labels, label_smoothing=0.1)
    torch.testing.assert_close(task.loss(scores, labels), expected)


def test_full_finetune_learns_digits_and_writes_its_artifacts(digits8, tmp_path):
    train, test = digits8
    cfg = _cfg(epochs=3, lr=3e-2, warmup_epochs=0.5)
    res = finetune(_resnet(), train, test, cfg, run_dir=tmp_path / "run", progress=False)
    assert res["final"]["top1"] > 50.0            # chance is 10%
    assert res["best"]["top1"] >= res["final"]["top1"] and res["main_metric"] == "top1"
    assert res["steps"] == 3 * 23                 # ceil(1437 / 64) near-equal batches per epoch
    assert res["trainable_params"] == sum(p.numel() for p in res["classifier"].parameters())

    run = tmp_path / "run"
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and all("top1" in r and "loss" in r for r in lines)
    assert lines[-1]["top1"] == res["final"]["top1"]
    assert max(r["top1"] for r in lines) == res["best"]["top1"]
    assert load_config(run / "config.yaml", cls=FinetuneConfig) == cfg
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
    res = finetune(backbone, small, test, _cfg(mode="partial", partial_blocks=1, lr=1e-2), progress=False)
    after = backbone.state_dict()
    for k, v in after.items():
        if k.startswith("stages.3."):        # the last block: weights and BN statistics move
            if not k.endswith("num_batches_tracked"):
                assert not torch.equal(v, before[k]), k
        else:                                 # stem and stages 0-2: weights AND BN buffers untouched
            assert torch.equal(v, before[k]), k
    assert res["classifier"].head.weight.abs().max() > 1e-3
    assert all(p.requires_grad for p in backbone.parameters())    # flags restored afterwards


def test_linear_mode_trains_only_the_head(digits8):
    train, test = digits8
    small = train.subset(torch.arange(256))
    backbone = _resnet()
    before = _state(backbone)
    res = finetune(backbone, small, test, _cfg(mode="linear", epochs=2, lr=1e-2), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    clf = res["classifier"]
    assert clf.head.weight.abs().max() > 1e-3
    assert clf.feature_norm.num_batches_tracked.item() == res["steps"]  # MAE's BN before the head
    assert res["trainable_params"] == clf.head.weight.numel() + clf.head.bias.numel()


def test_same_seed_same_run_and_another_seed_differs(digits8):
    train, test = digits8
    small = train.subset(torch.arange(128))

    def run(seed):
        torch.manual_seed(123)   # the backbone is built outside: same weights every time
        vit = create_model("vit_tiny_patch4_32", img_size=8, patch_size=2, depth=2, dim=24, num_heads=2)
        res = finetune(vit, small, test, _cfg(drop_path_rate=0.2, seed=seed, lr=1e-2, batch_size=32), progress=False)
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

    ft_apply = ft.apply_lr
    monkeypatch.setattr(ft, "apply_lr", spy)
    cfg = _cfg(mode="full", epochs=4, batch_size=64, lr=0.256, schedule="step", milestones=[0.5, 0.75],
               layer_decay=0.5, optimizer="sgd")
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
    res = finetune(_resnet(), train, test, _cfg(epochs=4, batch_size=4, lr=2e-2), progress=False)
    assert res["train_images"] == 13 and res["test_images"] == 12
    assert res["final"]["top1"] == 100.0       # dark vs light: trivially separable


def test_load_for_finetune_specs(tmp_path):
    # random: seeded
    a, b = load_for_finetune("random:resnet10_cifar", 8, seed=3), load_for_finetune("random:resnet10_cifar", 8, seed=3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    # a keel run directory; at another image size a ViT's position table is resampled
    from keel.engine.checkpoint import export_backbone
    vit = create_model("vit_tiny_patch4_32", img_size=16, depth=1, dim=24, num_heads=2)
    kwargs = {"img_size": 16, "depth": 1, "dim": 24, "num_heads": 2}
    export_backbone(vit, tmp_path / "run", {"model": "vit_tiny_patch4_32", "model_kwargs": kwargs})
    same = load_for_finetune(str(tmp_path / "run"), 16)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in vit.state_dict().items())
    small = load_for_finetune(str(tmp_path / "run" / "backbone.safetensors"), 8)
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
            m = load_for_finetune(spec, 32).eval()
            assert isinstance(m.head, nn.Identity)
            torch.testing.assert_close(m.embed(x), want, rtol=1e-4, atol=1e-5)
        assert load_for_finetune(f"timm:vit_tiny_patch16:{tmp_path / 'w.pth'}", 48).pos_embed.shape == (1, 10, 192)
    with pytest.raises(ValueError, match="timm:<model name>:<path"):
        load_for_finetune("timm:vit_tiny_patch16", 32)


@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch4_32", dict(img_size=16, depth=3, dim=24, num_heads=2)),
    ("swin_tiny", dict(embed_dim=8, depths=(1, 2, 2), num_heads=(1, 1, 1), window_size=2)),
    ("keel_tiny", dict(img_size=32, widths=(8, 16, 32, 64), depths=(1, 2, 2, 1))),
    ("resnet10_cifar", {}),
])
def test_set_drop_path_matches_the_rates_models_are_built_with(name, kw):
    def rates(model):
        return {n: m.p for n, m in model.named_modules() if isinstance(m, ft.DropPath)}

    built = create_model(name, drop_path_rate=0.3, **kw)
    later = create_model(name, **kw)
    ft.set_drop_path(later, 0.3)
    assert rates(later) == pytest.approx(rates(built)) and max(rates(built).values()) == pytest.approx(0.3)


# ---------------------------------------------------------------------------------- DeiT recipe, EMA
DEIT = dict(optimizer="adamw", weight_decay=0.05, schedule="cosine", warmup_epochs=5.0, label_smoothing=0.1,
            randaugment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, mix_switch_prob=0.5, reprob=0.25,
            drop_path_rate=0.1, repeated_aug=3)


def test_deit_recipe_fills_exactly_the_deit_values(capsys):
    import dataclasses
    cfg = ft.apply_recipe(FinetuneConfig(recipe="deit", batch_size=512))
    for key, value in DEIT.items():
        assert getattr(cfg, key) == value, key
    assert cfg.lr * cfg.batch_size / 256 == pytest.approx(5e-4 * 512 / 512)   # DeiT: 5e-4 x batch / 512
    assert cfg.model_ema == 0.0 and cfg.distill == "none" and cfg.epochs == 50  # left alone
    untouched = {f.name for f in dataclasses.fields(FinetuneConfig)} - set(DEIT) - {"recipe", "lr", "batch_size"}
    assert all(getattr(cfg, k) == getattr(FinetuneConfig(), k) for k in untouched)
    printed = capsys.readouterr().out
    assert "recipe deit: set lr=0.00025" in printed and "mixup=0.8" in printed and "repeated_aug=3" in printed
    assert ft.apply_recipe(cfg, verbose=False) == cfg                           # applying twice: no change

    # what the user set is kept; another optimizer keeps its own lr and weight decay
    mine = ft.apply_recipe(FinetuneConfig(recipe="deit", mixup=0.2, lr=1e-3, reprob=0.0 + 0.1), verbose=False)
    assert (mine.mixup, mine.lr, mine.reprob, mine.cutmix) == (0.2, 1e-3, 0.1, 1.0)
    sgd = ft.apply_recipe(FinetuneConfig(recipe="deit", optimizer="sgd"), verbose=False)
    assert sgd.optimizer == "sgd" and sgd.lr is None and sgd.weight_decay is None and sgd.mixup == 0.8
    assert ft.apply_recipe(FinetuneConfig()) == FinetuneConfig()
    with pytest.raises(ft.ConfigError, match="recipe must be"):
        ft.apply_recipe(FinetuneConfig(recipe="beit"))


@pytest.mark.parametrize("kw,match", [
    (dict(distill="medium"), "distill must be"), (dict(randaugment="rand-m9-x3"), "unknown part"),
    (dict(mixup=-1.0), "Beta alphas"), (dict(reprob=1.5), "reprob"), (dict(model_ema=1.0), "model_ema"),
    (dict(repeated_aug=0), "repeated_aug"), (dict(repeated_aug=65), "repeated_aug"),
    (dict(teacher="random:resnet10_cifar"), "distill=none"), (dict(distill_tau=0.0), "distill_tau"),
])
def test_recipe_and_distillation_keys_are_checked(kw, match):
    with pytest.raises(ft.ConfigError, match=match):
        ft._check(_cfg(**kw))


def test_distillation_without_a_teacher_or_with_another_task_is_refused(digits8):
    train, test = digits8
    with pytest.raises(ft.ConfigError, match="needs a teacher"):
        finetune(_resnet(), train, test, _cfg(distill="hard"), progress=False)

    from keel.evaluate.multilabel import MultiLabelTask
    with pytest.raises(ft.ConfigError, match="single-label classification"):
        finetune(_resnet(), train, test, _cfg(mixup=0.8), task=MultiLabelTask(10), progress=False)


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
        ft.update_ema(ema, model, 0.9)
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
    real = ft.update_ema

    def spy(ema, model, decay):
        recorded.append(_state(model))
        real(ema, model, decay)

    monkeypatch.setattr(ft, "update_ema", spy)
    torch.manual_seed(5)
    vit = create_model("vit_tiny_patch4_32", img_size=8, patch_size=2, depth=2, dim=24, num_heads=2)
    start = {f"backbone.{k}": v.clone() for k, v in vit.state_dict().items()}
    res = finetune(vit, small, test, _cfg(model_ema=0.7, lr=1e-2, batch_size=48, epochs=1), run_dir=tmp_path / "r",
                   progress=False)
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
    real = ft._batches

    def spy(ds, index_batches, *args):
        index_batches = list(index_batches)
        seen.append(index_batches)
        return real(ds, index_batches, *args)

    monkeypatch.setattr(ft, "_batches", spy)
    res = finetune(_resnet(), small, test, _cfg(repeated_aug=4, batch_size=32, lr=1e-2), progress=False)
    assert res["steps"] == 4
    epoch = seen[0]
    assert sum(len(b) for b in epoch) == 128 and len(torch.cat(epoch).unique()) == 32
    assert all(torch.all(b.unique(return_counts=True)[1] == 4) for b in epoch)


# ---------------------------------------------------------------------------------- BiT upstream, CSV tasks
def test_bit_upstream_recipe_is_bits_from_scratch_training(capsys):
    cfg = ft.apply_recipe(FinetuneConfig(recipe="bit-upstream", batch_size=512))
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.schedule) == ("sgd", 0.9, 1e-4, "step")
    assert cfg.lr * cfg.batch_size / 256 == pytest.approx(0.03 * 512 / 256)   # BiT: 0.03 x batch / 256
    assert [m * 90 for m in cfg.milestones] == pytest.approx([30, 60, 80])    # of BiT's 90 epochs
    assert cfg.label_smoothing == 0.0 and cfg.drop_path_rate == 0.0 and cfg.mixup == 0.0
    assert "recipe bit-upstream: set optimizer='sgd'" in capsys.readouterr().out
    # a user's lr is kept
    assert ft.apply_recipe(FinetuneConfig(recipe="bit-upstream", lr=0.1), verbose=False).lr == 0.1


def _tiny_train(digits8, n=64):
    train, _ = digits8
    return train.subset(torch.arange(n)) if hasattr(train, "subset") else train


def test_a_finetune_run_is_a_backbone_for_the_next_finetune(digits8, tmp_path):
    # BiT's chain: upstream training (a finetune run) -> its backbone fine-tuned downstream
    train, test = digits8
    cfg = _cfg(backbone="random:resnet10_cifar", recipe="bit-upstream", epochs=1)
    finetune(load_for_finetune(cfg.backbone, 8), train, test, cfg, run_dir=tmp_path / "up", progress=False)
    saved = load_file(str(tmp_path / "up" / "classifier.safetensors"))
    for spec in (tmp_path / "up", tmp_path / "up" / "classifier.safetensors"):
        model = load_for_finetune(str(spec), 8)
        own = model.state_dict()
        assert set(own) == {k[len("backbone."):] for k in saved if k.startswith("backbone.")}
        assert all(torch.equal(own[k[len("backbone."):]], v) for k, v in saved.items() if k.startswith("backbone."))
        assert isinstance(getattr(model, "head", nn.Identity()), nn.Identity)

    # a ViT fine-tuned at 8 px, taken on at 16 px: the position table is resampled, the rest kept
    vcfg = _cfg(backbone="random:vit_tiny_patch4_32", epochs=1)
    small = train.subset(torch.arange(64))
    finetune(load_for_finetune(vcfg.backbone, 8), small, small, vcfg, run_dir=tmp_path / "vit", progress=False)
    vsaved = load_file(str(tmp_path / "vit" / "classifier.safetensors"))
    big = load_for_finetune(str(tmp_path / "vit"), 16)
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
    cfg = _cfg(backbone="random:resnet10_cifar", source=str(tmp_path / "labels.csv"), epochs=1,
               multilabel_loss="asl", threshold=0.3)
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
    cfg = _cfg(backbone="random:resnet10_cifar", source=str(tmp_path / "train.csv"),
               test_source=str(tmp_path / "test.csv"), epochs=1, mode="linear")
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
        ft.labeled_data(ft.replace(cfg, test_source=str(tmp_path / "ml.csv")))
    with pytest.raises(ft.ConfigError, match="test_source is for a CSV"):
        ft.labeled_data(ft.replace(cfg, source="digits"))


def test_default_run_dir_names_the_backbone_and_the_data():
    name = ft.default_run_dir(FinetuneConfig(backbone="runs/simclr-x/", source="/data/tags.csv", mode="linear")).name
    assert name.startswith("finetune-linear-simclr-x-tags-")
    name = ft.default_run_dir(FinetuneConfig(backbone="random:resnet10_cifar", source="digits")).name
    assert name.startswith("finetune-full-resnet10_cifar-digits-")
