"""MAE: patchify, masking, the visible-token encoder, the loss against hand-computed values,
reconstructions, one training step and one pretraining run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import keel
from keel.config import RunConfig
from keel.tasks.ssl.mae import (MAE, masked_mse, normalize_patches, num_kept, patchify, random_masking,
                              sincos_pos_embed, unpatchify)


def _cfg(img_size: int = 16, **method) -> RunConfig:
    cfg = RunConfig()
    cfg.data.img_size = img_size
    cfg.method.decoder_dim, cfg.method.decoder_depth, cfg.method.decoder_heads = 32, 1, 4
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg


def _vit(img_size: int = 16, **kw):
    return keel.create_model("vit_tiny_patch4_32", img_size=img_size, depth=2, dim=48, num_heads=3, **kw)


def _mae(img_size: int = 16, **method) -> MAE:
    torch.manual_seed(0)
    return MAE(_vit(img_size), _cfg(img_size, **method))


def _images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _patches_by_unfold(x: torch.Tensor, p: int) -> torch.Tensor:
    """Patches with F.unfold: (B, C*p*p, L) in (channel, row, column) order -> MAE's (row, column,
    channel) order within each patch."""
    B, C = x.shape[:2]
    cols = F.unfold(x, p, stride=p)                        # (B, C*p*p, L)
    return cols.view(B, C, p, p, -1).permute(0, 4, 2, 3, 1).reshape(B, -1, p * p * C)


# ---------------------------------------------------------------- patches and positions
def test_patchify_matches_unfold_and_lightly_and_inverts():
    x = torch.randn(2, 3, 8, 12)
    ours = patchify(x, 4)
    assert ours.shape == (2, 6, 48)
    assert torch.equal(ours, _patches_by_unfold(x, 4))
    # patch 4 (row 1, column 1) starts at pixel (4, 4); its entry (r, c, ch) is x[ch, 4 + r, 4 + c]
    assert ours[1, 3 + 1, (2 * 4 + 3) * 3 + 1] == x[1, 1, 4 + 2, 4 + 3]
    assert torch.equal(unpatchify(ours, 4, (2, 3)), x)
    utils = pytest.importorskip("lightly.models.utils")
    sq = torch.randn(2, 3, 8, 8)
    assert torch.equal(patchify(sq, 4), utils.patchify(sq, 4))


def test_sincos_matches_mae_table_and_formula():
    pe = sincos_pos_embed(16, 3, 3)
    assert pe.shape == (9, 16)
    # position (row 1, column 2) = index 5: columns in channels 0-7, rows in 8-15, [sin | cos]
    w = [1.0 / 10000 ** (k / 4) for k in range(4)]
    expected = ([torch.tensor(2 * f).sin() for f in w] + [torch.tensor(2 * f).cos() for f in w]
                + [torch.tensor(1 * f).sin() for f in w] + [torch.tensor(1 * f).cos() for f in w])
    torch.testing.assert_close(pe[5], torch.stack(expected).float())
    utils = pytest.importorskip("lightly.models.utils")
    ref = utils.get_2d_sine_cosine_positional_embedding(32, 4, cls_token=False)
    torch.testing.assert_close(sincos_pos_embed(32, 4, 4), torch.as_tensor(ref).float(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(18, 2, 2)


# ---------------------------------------------------------------- masking
@pytest.mark.parametrize("n,ratio", [(16, 0.75), (64, 0.75), (49, 0.75), (10, 0.5), (7, 0.9)])
def test_random_masking_keeps_round_n_times_one_minus_ratio_distinct_patches(n, ratio):
    noise = torch.rand(5, n, generator=torch.Generator().manual_seed(n))
    k = num_kept(n, ratio)
    assert k == max(1, round(n * (1 - ratio)))
    kept, restore, mask = random_masking(noise, k)
    assert kept.shape == (5, k)
    for b in range(5):
        assert len(set(kept[b].tolist())) == k                       # distinct
        assert set(kept[b].tolist()) == set(torch.nonzero(~mask[b]).flatten().tolist())
        # the kept ones are the k lowest-noise patches
        assert set(kept[b].tolist()) == set(noise[b].topk(k, largest=False).indices.tolist())
    assert (mask.sum(1) == n - k).all()
    hidden = torch.stack([torch.nonzero(mask[b]).flatten() for b in range(5)])
    order = torch.cat([kept, hidden], 1)  # any order of the hidden ones: restore only needs a permutation
    shuffled = noise.argsort(1)
    assert torch.equal(shuffled.gather(1, restore), torch.arange(n).expand(5, n))
    assert order.sort(1).values.equal(torch.arange(n).expand(5, n))


def test_make_views_are_crops_only_and_deterministic():
    m = _mae()
    vc = m.augment.cfg
    assert (vc.jitter_p, vc.gray_p, vc.blur_p, vc.scale) == (0.0, 0.0, 0.0, (0.2, 1.0))
    images = _images(n=6, size=20)
    x, noise = m.make_views(images, torch.Generator().manual_seed(3))
    assert x.shape == (6, 3, 16, 16) and noise.shape == (6, 16)
    y, noise2 = m.make_views(images, torch.Generator().manual_seed(3))
    assert torch.equal(x, y) and torch.equal(noise, noise2)
    _, noise3 = m.make_views(images, torch.Generator().manual_seed(4))
    assert not torch.equal(noise, noise3)
    # a flat grey image stays flat grey: no colour op touched it
    grey = torch.full((2, 3, 16, 16), 100, dtype=torch.uint8)
    g, _ = m.make_views(grey, torch.Generator().manual_seed(0))
    torch.testing.assert_close(g, torch.full_like(g, (100 / 255 - 0.5) / 0.5))


# ---------------------------------------------------------------- the visible-token encoder
def test_forward_visible_equals_the_vit_run_by_hand_on_the_kept_tokens():
    torch.manual_seed(0)
    vit = _vit().eval()
    x = torch.randn(3, 3, 16, 16)
    kept = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(b))[:4] for b in range(3)])
    # by hand: conv patches + their own position embedding, gather, class token in front, blocks, norm
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
    tokens = torch.stack([tokens[b, kept[b]] for b in range(3)])
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(3, -1, -1)
    t = torch.cat([cls, tokens], 1)
    for blk in vit.blocks:
        t = blk(t)
    expected = vit.norm(t)
    got = vit.forward_visible(x, kept)
    assert got.shape == (3, 5, 48)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # hidden pixels never reach the encoder
    x2 = x.clone()
    hidden = sorted(set(range(16)) - set(kept[0].tolist()))[0]
    r, c = divmod(hidden, 4)
    x2[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5.0
    torch.testing.assert_close(vit.forward_visible(x2, kept)[0], got[0], atol=0, rtol=0)
    # all patches, in grid order: the ordinary forward
    everything = torch.arange(16).expand(3, 16)
    torch.testing.assert_close(vit.forward_visible(x, everything), vit.forward_tokens(x), atol=1e-5, rtol=1e-5)


def test_decoder_puts_tokens_back_in_grid_order_with_mask_tokens_in_the_gaps():
    m = _mae().eval()
    dec = m.decoder
    g = torch.Generator().manual_seed(2)
    noise = torch.rand(2, 16, generator=g)
    kept, restore, mask = random_masking(noise, 4)
    latent = torch.randn(2, 5, 48, generator=g)                 # class token + 4 kept patches
    y = dec.embed(latent)
    grid = dec.mask_token.expand(2, 16, 32).clone()              # by hand: the gaps hold the mask token
    for b in range(2):
        grid[b, kept[b]] = y[b, 1:]
    t = torch.cat([y[:, :1], grid + sincos_pos_embed(32, 4, 4)], 1)
    for blk in dec.blocks:
        t = blk(t)
    expected = dec.pred(dec.norm(t))[:, 1:]
    torch.testing.assert_close(dec(latent, restore, (4, 4)), expected, atol=1e-5, rtol=1e-5)


def test_mae_rejects_other_backbones_clearly():
    with pytest.raises(ValueError, match="MAE needs a ViT backbone.*simmim"):
        MAE(keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16)), _cfg())
    windowed = _vit(window_size=2, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="window"):
        MAE(windowed, _cfg())
    with pytest.raises(ValueError, match="forward_visible .*window"):
        windowed.forward_visible(torch.randn(1, 3, 16, 16), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE(_vit(), _cfg(mask_ratio=1.0))


# ---------------------------------------------------------------- the decoder's default size
def _rule(enc_dim: int, enc_depth: int, dim: int | None = None) -> tuple[int, int, int]:
    """The rule, written out: width = the encoder's, at most 512 (a multiple of 4); blocks = the
    per-token compute (blocks x width^2) of MAE's ViT-B pairing (8 x 512 over 12 x 768) scaled to
    this encoder, rounded, between 1 and 8; heads = the most that divide the width into heads of
    at least 32 channels."""
    if dim is None:
        dim = min(enc_dim, 512) // 4 * 4
    ratio = (8 * 512 * 512) / (12 * 768 * 768)
    depth = min(8, max(1, round(ratio * enc_depth * enc_dim * enc_dim / (dim * dim))))
    heads = max(h for h in range(1, dim + 1) if dim % h == 0 and dim / h >= 32) if dim >= 32 else 1
    return dim, depth, heads


def _decoder_shape(m: MAE) -> tuple[int, int, int]:
    """(width, blocks, heads) of the decoder the method built, read off its modules."""
    dec = m.decoder
    dim = dec.embed.out_features
    assert dec.mask_token.shape[-1] == dim and all(blk.attn.qkv.weight.shape == (3 * dim, dim) for blk in dec.blocks)
    heads = {blk.attn.num_heads for blk in dec.blocks}
    assert len(heads) == 1
    return dim, len(dec.blocks), heads.pop()


def test_default_decoder_scales_with_the_encoder():
    cfg = RunConfig()
    cfg.method.name = "mae"
    assert (cfg.method.decoder_dim, cfg.method.decoder_depth, cfg.method.decoder_heads) == (None, None, None)
    torch.manual_seed(0)
    vit = keel.create_model("vit_tiny_patch4_32")
    enc_dim, enc_depth = vit.num_features, len(vit.blocks)
    assert (enc_dim, enc_depth) == (192, 6)
    m = MAE(vit, cfg)
    expected = _rule(enc_dim, enc_depth)
    assert _decoder_shape(m) == expected == (192, 2, 6)
    assert {k: m.used[k] for k in ("decoder_dim", "decoder_depth", "decoder_heads")} == \
        dict(zip(("decoder_dim", "decoder_depth", "decoder_heads"), expected))
    # far smaller than the old fixed 8 x 512 decoder (25.3M parameters on this encoder)
    assert sum(p.numel() for p in m.decoder.parameters()) < sum(p.numel() for p in vit.parameters()) / 2
    # the rule on other encoders: MAE's own 8 x 512 with 16 heads for ViT-B, -L and -H
    from keel.tasks.ssl.mae import default_decoder
    for enc in [(768, 12), (1024, 24), (1280, 32)]:
        assert default_decoder(*enc) == _rule(*enc) == (512, 8, 16)
    for enc in [(384, 12), (192, 12), (48, 2), (100, 3), (24, 1)]:
        assert default_decoder(*enc) == _rule(*enc), enc
    # the tests' small ViT (48 wide, 2 blocks): one block of 48 with one head
    assert _decoder_shape(MAE(_vit(), cfg)) == _rule(48, 2) == (48, 1, 1)


@pytest.mark.parametrize("given", [dict(decoder_dim=96, decoder_depth=3, decoder_heads=4),
                                   dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
                                   dict(decoder_dim=64), dict(decoder_depth=5), dict(decoder_heads=3)])
def test_explicit_decoder_values_win(given):
    cfg = RunConfig()
    for k, v in given.items():
        setattr(cfg.method, k, v)
    torch.manual_seed(0)
    m = MAE(keel.create_model("vit_tiny_patch4_32"), cfg)
    # the keys left None follow the rule, from the explicit width when there is one
    dim, depth, heads = _rule(192, 6, given.get("decoder_dim"))
    expected = (given.get("decoder_dim", dim), given.get("decoder_depth", depth), given.get("decoder_heads", heads))
    assert _decoder_shape(m) == expected
    assert (m.used["decoder_dim"], m.used["decoder_depth"], m.used["decoder_heads"]) == expected


def test_decoder_width_must_divide_into_its_heads():
    with pytest.raises(ValueError, match="divisible"):
        MAE(_vit(), _cfg(decoder_dim=40, decoder_heads=3))
    with pytest.raises(ValueError, match="at least 1"):
        MAE(_vit(), _cfg(decoder_heads=0))


def test_config_yaml_records_the_resolved_decoder(make_cfg, tmp_path):
    import yaml
    from keel.jobs.pretrain import pretrain
    args = ["method.name=mae", "model.name=vit_tiny_patch4_32", "data.img_size=16", "train.batch_size=16",
            "data.subset=32", "train.max_steps=1", "train.knn_every=0"]
    cfg = make_cfg(*args)
    assert cfg.method.decoder_dim is None
    pretrain(cfg, run_dir=tmp_path / "default", quiet=True)
    saved = yaml.safe_load((tmp_path / "default" / "config.yaml").read_text())["method"]
    assert (saved["decoder_dim"], saved["decoder_depth"], saved["decoder_heads"]) == _rule(192, 6)
    pretrain(make_cfg(*args, "method.decoder_depth=3"), run_dir=tmp_path / "depth3", quiet=True)
    saved = yaml.safe_load((tmp_path / "depth3" / "config.yaml").read_text())["method"]
    assert (saved["decoder_dim"], saved["decoder_depth"], saved["decoder_heads"]) == (192, 3, 6)
    # a run from the saved config builds the same decoder
    from keel.config import load_config
    again = load_config(tmp_path / "depth3" / "config.yaml")
    torch.manual_seed(0)
    assert _decoder_shape(MAE(keel.create_model("vit_tiny_patch4_32", img_size=16), again)) == (192, 3, 6)


# ---------------------------------------------------------------- the loss
def _loss_by_hand(pred, x, mask, p, norm_pix):
    """Per hidden patch: mean over its p*p*3 values of (pred - target)^2, target = its pixels
    (minus their mean, over sqrt(unbiased variance + 1e-6) with norm_pix); mean over hidden patches."""
    target = _patches_by_unfold(x, p)
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        for i in range(target.shape[1]):
            if not mask[b, i]:
                continue
            t = target[b, i].double()
            if norm_pix:
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6).sqrt()
            total += ((pred[b, i].double() - t) ** 2).mean().item()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_training_loss_equals_hand_formula_on_hidden_patches(norm_pix):
    m = _mae(img_size=8, norm_pix_loss=norm_pix)
    x, noise = m.make_views(_images(n=3, size=8), torch.Generator().manual_seed(0))
    pred, mask = m.predict(x, noise)
    assert pred.shape == (3, 4, 48) and (mask.sum(1) == 3).all()      # 2x2 patches, 1 kept
    loss = m.training_step((x, noise))["loss"]
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_loss_by_hand(pred.detach(), x, mask, 4, norm_pix), rel=1e-5)


def test_loss_ignores_visible_patches_and_is_a_mean_over_images():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 6, 12, generator=g), torch.randn(4, 6, 12, generator=g)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 1:4] = True
    base = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[:, 0] += 3.0        # a visible patch
    changed[2, 5] -= 1.0        # another one
    assert masked_mse(changed, target, mask).item() == base.item()
    changed[0, 2] += 1.0        # a hidden patch
    assert masked_mse(changed, target, mask).item() != pytest.approx(base.item())
    # hand formula; and equal hidden counts per image: the mean of the halves' losses is the
    # whole batch's (what the mean over 2 processes computes)
    expected = ((pred - target) ** 2).mean(-1)[:, 1:4].mean()
    assert base.item() == pytest.approx(expected.item(), rel=1e-6)
    halves = (masked_mse(pred[:2], target[:2], mask[:2]) + masked_mse(pred[2:], target[2:], mask[2:])) / 2
    assert halves.item() == pytest.approx(base.item(), rel=1e-6)


def test_norm_pix_target_has_zero_mean_unit_variance_per_patch():
    m = _mae(norm_pix_loss=True)
    x, _ = m.make_views(_images(n=3), torch.Generator().manual_seed(0))
    t = m.target(x)
    assert t.shape == (3, 16, 48)
    torch.testing.assert_close(t.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)
    var = patchify(x, 4).var(-1)
    torch.testing.assert_close(t.var(-1), var / (var + 1e-6), atol=1e-5, rtol=0)
    assert (var > 1e-3).all() and t.var(-1).min() > 0.99
    plain = _mae(norm_pix_loss=False)
    assert torch.equal(plain.target(x), patchify(x, 4))
    n, mean, v = normalize_patches(torch.tensor([[[1.0, 2.0, 3.0, 6.0]]]))
    assert mean.item() == 3.0 and v.item() == pytest.approx(14 / 3)


# ---------------------------------------------------------------- training step and pictures
def test_training_step_reaches_every_parameter():
    m = _mae()
    m.train()
    out = m(m.make_views(_images(n=4), torch.Generator().manual_seed(0)))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in m.named_parameters():   # DDP: no parameter may be left out of the graph
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert m.decoder.mask_token.grad.abs().sum() > 0


def test_reconstruct_pastes_visible_patches_and_greys_hidden_ones():
    m = _mae().eval()
    images = _images(n=3)
    out = m.reconstruct(images, torch.Generator().manual_seed(5))
    original = images.float() / 255
    torch.testing.assert_close(out["original"], original, atol=1e-6, rtol=0)
    hidden = ~torch.isclose(out["masked"], out["original"], atol=0, rtol=0)
    for key in ("original", "masked", "reconstruction"):
        assert out[key].shape == (3, 3, 16, 16) and out[key].min() >= 0 and out[key].max() <= 1
    # per 4x4 patch: visible = the original exactly; hidden = grey in "masked"
    vis = patchify(out["original"], 4)
    rec, msk = patchify(out["reconstruction"], 4), patchify(out["masked"], 4)
    grey_patch = (msk == 0.5).all(-1)
    assert (grey_patch.sum(1) == 16 - num_kept(16, 0.75)).all()
    assert torch.equal(rec[~grey_patch], vis[~grey_patch])
    assert torch.equal(msk[~grey_patch], vis[~grey_patch])
    assert hidden.any()
    assert not torch.equal(rec[grey_patch], vis[grey_patch])   # hidden patches are drawn
    # same generator seed, same mask
    again = m.reconstruct(images, torch.Generator().manual_seed(5))
    assert torch.equal(again["masked"], out["masked"])


def test_reconstruct_undoes_norm_pix_exactly_for_a_perfect_decoder():
    m = _mae(norm_pix_loss=True).eval()
    real = m.predict
    m.predict = lambda x, noise: (m.target(x), real(x, noise)[1])   # the decoder's ideal output
    images = _images(n=2)
    out = m.reconstruct(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["reconstruction"], out["original"], atol=1e-5, rtol=0)


def test_pretrain_smoke(make_cfg, tmp_path):
    from keel.jobs.pretrain import pretrain
    cfg = make_cfg("method.name=mae", "model.name=vit_tiny_patch4_32", "data.img_size=16",
                   "method.decoder_depth=1", "method.decoder_dim=32", "method.decoder_heads=4",
                   "train.batch_size=16", "data.subset=32", "train.max_steps=2")
    result = pretrain(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    assert (tmp_path / "run" / "backbone.safetensors").is_file()


def test_pretrain_exports_the_patch_token_mean_with_global_pool_avg(make_cfg, tmp_path):
    """``model.global_pool=avg`` rides on the backbone's card: the exported ViT's feature is the
    mean of its patch tokens (not the class token), and the training itself is the same."""
    from keel.engine.checkpoint import load_backbone, read_card
    from keel.jobs.pretrain import pretrain
    args = ["method.name=mae", "model.name=vit_tiny_patch4_32", "data.img_size=16", "method.decoder_depth=1",
            "method.decoder_dim=32", "method.decoder_heads=4", "train.batch_size=16", "data.subset=32",
            "train.max_steps=2"]
    pretrain(make_cfg(*args), run_dir=tmp_path / "token", quiet=True)
    pretrain(make_cfg(*args, "model.global_pool=avg"), run_dir=tmp_path / "avg", quiet=True)
    assert read_card(tmp_path / "avg")[1]["model_kwargs"]["global_pool"] == "avg"
    token, avg = load_backbone(tmp_path / "token").eval(), load_backbone(tmp_path / "avg").eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = avg.forward_tokens(x)
        for (name, a), b in zip(avg.state_dict().items(), token.state_dict().values()):
            assert torch.equal(a, b), name  # pooling does not change what MAE trains
        torch.testing.assert_close(avg(x), tokens[:, 1:].mean(1))
        torch.testing.assert_close(token(x), tokens[:, 0])
        assert not torch.allclose(avg(x), token(x))


@pytest.mark.parametrize("extra, message", [
    (["model.name=resnet10_cifar"], "only ViT and DeiT models"),
    (["model.name=vit_tiny_patch4_32", "model.global_pool=max"], "must be token"),
])
def test_global_pool_is_checked_before_training(make_cfg, tmp_path, extra, message):
    from keel.config import ConfigError
    from keel.jobs.pretrain import pretrain
    cfg = make_cfg("model.global_pool=avg", *extra)
    with pytest.raises(ConfigError, match=message):
        pretrain(cfg, run_dir=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
