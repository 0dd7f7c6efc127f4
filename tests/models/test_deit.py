"""DeiT: the distillation token and its head (train/eval outputs, pooling), sizes, timm numerics."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import keel
import keel.models.vit  # noqa: F401  (registers the deit_* builders)
from keel.convert import from_timm, to_timm
from keel.models.vit import TIMM_NAMES

DEITS = ["deit_tiny_patch16", "deit_small_patch16", "deit_base_patch16",
         "deit_tiny_distilled_patch16", "deit_small_distilled_patch16", "deit_base_distilled_patch16"]


def tiny_distilled(**kw):
    args = dict(img_size=32, depth=2, dim=32, num_heads=2)
    args.update(kw)
    return keel.create_model("deit_tiny_distilled_patch16", **args)


@pytest.mark.parametrize("name, paper", [
    ("deit_tiny_patch16", 5.7e6), ("deit_small_patch16", 22.1e6), ("deit_base_patch16", 86.6e6),
    ("deit_base_distilled_patch16", 87.3e6),   # DeiT README, with the 1000-class head(s)
])
def test_parameter_counts_match_the_paper(name, paper):
    with torch.device("meta"):
        m = keel.create_model(name, num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(paper, rel=0.01)


def test_registry_and_token_layout():
    assert keel.list_models("deit") == sorted(DEITS)
    m = tiny_distilled(num_classes=3)
    assert m.num_prefix_tokens == 2 and m.dist_token.shape == (1, 1, 32)
    assert m.pos_embed.shape == (1, 2 + 4, 32)          # class, distillation, then the 2x2 patches
    assert isinstance(m.head_dist, nn.Linear) and m.head_dist.out_features == 3
    plain = keel.create_model("deit_tiny_patch16", img_size=32, depth=2, dim=32, num_heads=2)
    assert plain.num_prefix_tokens == 1 and plain.dist_token is None and not hasattr(plain, "head_dist")
    with pytest.raises(ValueError, match="class_token=True and global_pool='token'"):
        tiny_distilled(global_pool="avg")


def test_distilled_train_returns_both_heads_and_eval_their_average():
    torch.manual_seed(0)
    m = tiny_distilled(num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    out = m(x)
    assert isinstance(out, tuple) and len(out) == 2
    cls, dist = out
    assert cls.shape == dist.shape == (2, 4)
    t = m.forward_tokens(x)
    torch.testing.assert_close(cls, m.head(t[:, 0]))
    torch.testing.assert_close(dist, m.head_dist(t[:, 1]))
    assert not torch.allclose(cls, dist)                 # two tokens, two heads
    m.eval()
    avg = m(x)
    assert isinstance(avg, torch.Tensor)
    torch.testing.assert_close(avg, (cls + dist) / 2)     # no dropout here: train == eval tokens
    # embed pools the two tokens' features, like timm's pre_logits
    torch.testing.assert_close(m.embed(x), (t[:, 0] + t[:, 1]) / 2)
    # head-less: forward is embed in both modes
    h = tiny_distilled()
    for mode in (True, False):
        h.train(mode)
        torch.testing.assert_close(h(x), h.embed(x))


def test_hard_distillation_step_trains_both_tokens():
    torch.manual_seed(0)
    m = tiny_distilled(num_classes=4).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    teacher = torch.tensor([1, 2])                        # the teacher's argmax
    cls, dist = m(x)
    loss = (nn.functional.cross_entropy(cls, y) + nn.functional.cross_entropy(dist, teacher)) / 2
    loss.backward()
    for p in (m.cls_token, m.dist_token, m.head.weight, m.head_dist.weight, m.pos_embed):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_feature_maps_skip_both_prefix_tokens():
    m = tiny_distilled().eval()
    x = torch.randn(1, 3, 32, 48)
    (fm,) = m.feature_maps(x)
    assert fm.shape == (1, 32, 2, 3)
    torch.testing.assert_close(fm.flatten(2).transpose(1, 2), m.forward_tokens(x)[:, 2:])


@pytest.mark.parametrize("size", [224, 160])
def test_distilled_matches_timm_in_train_and_eval_and_converts_back(size):
    timm = pytest.importorskip("timm")
    name = "deit_tiny_distilled_patch16"
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=5, img_size=size)
    sd = ref.state_dict()
    assert sd["pos_embed"].shape[1] == 2 + (size // 16) ** 2   # timm's table covers both tokens
    m = keel.create_model(name, num_classes=5, img_size=size)
    m.load_state_dict(from_timm(name, sd), strict=True)
    x = torch.randn(1 if size == 224 else 2, 3, size, size)
    with torch.no_grad():
        ref.eval(), m.eval()
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.embed(x), ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   rtol=1e-5, atol=1e-5)
        ref.train(), m.train()
        ref.set_distilled_training(True)                  # timm returns both heads only then
        for ours, theirs in zip(m(x), ref(x)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    back = to_timm(name, m.state_dict())
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
