"""keel.hub: every kind of backbone spec resolves to the weights it names, at the one image-size
rule, and every failure names the argument it is about."""
import json

import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file

import keel
from keel.engine.checkpoint import export_backbone
from keel.hub import default_img_size, resolve_backbone, resolve_classifier
from keel.models.classifier import Classifier, DistilledHead
from keel.models.layers.position import interpolate_pos_embed

TINY = {"depth": 1, "dim": 32, "num_heads": 2, "patch_size": 4}


def pretrain_run(path, name="vit_tiny_patch4_32", size=16, **kw):
    """A run directory as the trainer's _finish leaves it: backbone.safetensors + card.json."""
    kwargs = dict(TINY, img_size=size, **kw)
    torch.manual_seed(1)
    backbone = keel.create_model(name, **kwargs)
    card = {"model": name, "model_kwargs": kwargs, "method": "mae",
            "data": {"source": "digits", "images": 10, "skipped": 0, "img_size": size},
            "epochs": 1.0, "steps": 1, "finished": True, "config": {}, "metrics": {}, "keel_version": "0.1.0"}
    export_backbone(backbone, path, card)
    return backbone


def finetune_run(path, upstream, classifier, size, sectioned, name="classifier.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path / name))
    cfg = ({"model": {"backbone": str(upstream)}, "data": {"img_size": size, "source": "digits"},
            "train": {"seed": 3, "epochs": 1}} if sectioned
           else {"backbone": str(upstream), "img_size": size, "seed": 3, "epochs": 1, "source": "digits"})
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------- pretraining runs
def test_pretraining_run_gives_its_weights_at_its_size(tmp_path):
    ref = pretrain_run(tmp_path / "run")
    for spec in (tmp_path / "run", tmp_path / "run" / "backbone.safetensors"):
        model, size = resolve_backbone(str(spec))
        assert size == 16 and model.cfg.img_size == 16
        same_weights(model, ref)
    assert default_img_size(str(tmp_path / "run")) == 16


def test_vit_resolved_at_another_size_resamples_its_position_table(tmp_path):
    ref = pretrain_run(tmp_path / "run", size=16)
    model, size = resolve_backbone(str(tmp_path / "run"), img_size=32)
    assert size == 32 and model.grid == 8
    old = ref.pos_embed.detach()
    expected = torch.cat([old[:, :1], interpolate_pos_embed(old[:, 1:], (4, 4), (8, 8))], dim=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)
    rest = {k: v for k, v in ref.state_dict().items() if k != "pos_embed"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in rest.items())


def test_size_dependent_weights_name_the_size_to_use(tmp_path):
    pretrain_run(tmp_path / "run", size=16, rel_pos=True)   # relative position tables depend on the grid
    with pytest.raises(ValueError, match=r"^model\.backbone: .*trained at 16 px.*use img_size=16"):
        resolve_backbone(str(tmp_path / "run"), img_size=32)


def test_damaged_weights_fail_the_card_sha256(tmp_path):
    pretrain_run(tmp_path / "run")
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    (tmp_path / "run" / "card.json").write_text(json.dumps(dict(card, sha256="0" * 64)))
    with pytest.raises(ValueError, match=r"^model\.backbone: .*sha256"):
        resolve_backbone(str(tmp_path / "run"))


def test_a_pretraining_run_is_not_a_classifier(tmp_path):
    pretrain_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"^distill\.teacher: '.*run' is a backbone without a classifier head: "
                                         r"fine-tune it first"):
        resolve_classifier(str(tmp_path / "run"), 3)


# ---------------------------------------------------------------------------------- fine-tune runs
@pytest.mark.parametrize("sectioned", [False, True])
def test_finetune_run_gives_its_backbone_and_its_classifier(tmp_path, sectioned):
    up = pretrain_run(tmp_path / "up", size=16)
    torch.manual_seed(2)
    backbone = keel.create_model("vit_tiny_patch4_32", **dict(TINY, img_size=16))
    clf = Classifier(backbone, nn.Linear(32, 3)).eval()
    finetune_run(tmp_path / "ft", tmp_path / "up", clf, size=24 if sectioned else 16, sectioned=sectioned)
    assert not torch.equal(backbone.pos_embed, up.pos_embed)

    if not sectioned:
        for spec in (tmp_path / "ft", tmp_path / "ft" / "classifier.safetensors"):
            model, size = resolve_backbone(str(spec))
            assert size == 16
            same_weights(model, backbone)
    assert default_img_size(str(tmp_path / "ft")) == (24 if sectioned else 16)
    # the model name and keywords a card records, for a fine-tune run and for the run it came from
    from keel.hub import model_of
    assert model_of(str(tmp_path / "ft")) == model_of(str(tmp_path / "up")) == ("vit_tiny_patch4_32", TINY)
    assert model_of("random:resnet10_cifar") == ("resnet10_cifar", {})

    teacher = resolve_classifier(str(tmp_path / "ft"), 3, img_size=16)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), clf.head(backbone.embed(x)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^distill\.teacher: .* predicts 3 classes, the data has 10"):
        resolve_classifier(str(tmp_path / "ft"), 10)


def test_finetune_classifier_keeps_feature_norm_and_distilled_heads(tmp_path):
    pretrain_run(tmp_path / "up", size=16)
    torch.manual_seed(4)
    clf = Classifier(keel.create_model("vit_tiny_patch4_32", **dict(TINY, img_size=16)), nn.Linear(32, 4),
                     feature_norm=True)
    clf.feature_norm.running_mean.normal_()
    clf.feature_norm.running_var.uniform_(0.5, 2)
    finetune_run(tmp_path / "ft", tmp_path / "up", clf.eval(), 16, sectioned=True, name="classifier_ema.safetensors")
    (tmp_path / "ft" / "classifier.safetensors").touch()   # the ema file is picked by its own name
    teacher = resolve_classifier(str(tmp_path / "ft" / "classifier_ema.safetensors"), 4)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), clf(x), rtol=0, atol=0)

    pretrain_run(tmp_path / "dup", name="deit_tiny_distilled_patch16", size=16)
    torch.manual_seed(5)
    dbb = keel.create_model("deit_tiny_distilled_patch16", **dict(TINY, img_size=16))
    dclf = Classifier(dbb, DistilledHead(nn.Linear(32, 4), nn.Linear(32, 4))).eval()
    finetune_run(tmp_path / "dft", tmp_path / "dup", dclf, 16, sectioned=False)
    teacher = resolve_classifier(str(tmp_path / "dft"), 4)
    assert isinstance(teacher.head, DistilledHead)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), dclf(x), rtol=0, atol=0)


def test_finetune_run_with_an_unresolvable_upstream_says_so(tmp_path):
    torch.manual_seed(2)
    clf = Classifier(keel.create_model("vit_tiny_patch4_32", **dict(TINY, img_size=16)), nn.Linear(32, 3))
    finetune_run(tmp_path / "ft", tmp_path / "gone", clf, 16, sectioned=True)
    with pytest.raises(ValueError, match=r"^model\.backbone: cannot rebuild the backbone of .*no such file"):
        resolve_backbone(str(tmp_path / "ft"))


# ---------------------------------------------------------------------------------- random:
def test_random_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, size = resolve_backbone("random:vit_tiny_patch4_32", seed=7)
    b, _ = resolve_backbone("random:vit_tiny_patch4_32", seed=7)
    c, _ = resolve_backbone("random:vit_tiny_patch4_32", seed=8)
    teacher = resolve_classifier("random:vit_tiny_patch4_32", 5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert size == 32 and default_img_size("random:resnet18") == 224
    same_weights(a, b)
    assert not torch.equal(a.pos_embed, c.pos_embed)
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ---------------------------------------------------------------------------------- timm:
def test_timm_state_dict_gives_timm_features_and_logits(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5).eval()
    sd = ref.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = ref.forward_head(ref.forward_features(x), pre_logits=True)
        logits = ref(x)
    for spec in (f"timm:vit_tiny_patch16_224:{tmp_path / 'w.safetensors'}",
                 f"timm:vit_tiny_patch16:{tmp_path / 'ckpt.pth'}"):
        model, size = resolve_backbone(spec)
        assert size == 224 and isinstance(model.head, nn.Identity)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), features, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(resolve_classifier(spec, 5)(x), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^distill\.teacher: .* predicts 5 classes, the data has 7"):
        resolve_classifier(spec, 7)


# ---------------------------------------------------------------------------------- errors
def test_errors_name_the_argument_and_the_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^distill\.teacher: no such file or directory 'runs/x'$") as e:
        resolve_classifier("runs/x", 3)
    assert "no backbone weights" not in str(e.value)
    with pytest.raises(ValueError, match=r"^model\.backbone: '.*' is neither a keel run directory") as e:
        resolve_backbone(str(tmp_path))
    assert "\n" not in str(e.value)
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"^eval\.checkpoint: '.*w\.safetensors' has no card\.json"):
        resolve_backbone(str(tmp_path / "w.safetensors"), arg="eval.checkpoint")
    with pytest.raises(ValueError, match=r"^model\.backbone: 'random:nope': unknown model 'nope'"):
        resolve_backbone("random:nope")
    with pytest.raises(ValueError, match=r"^model\.backbone: 'timm:vit_tiny_patch16': write timm:<model name>"):
        resolve_backbone("timm:vit_tiny_patch16")
    with pytest.raises(FileNotFoundError, match=r"^model\.backbone: no such file 'nowhere\.pth'"):
        default_img_size("timm:vit_tiny_patch16:nowhere.pth")
