"""SimMIM: the cell mask and its upsampling to the stem's tokens, masking inside each backbone,
the L1 loss against a hand-computed value, one training step and one pretraining run."""
from __future__ import annotations

import math

import pytest
import torch

import keel
from keel.config import RunConfig
from keel.tasks.ssl.simmim import SimMIM, default_mask_patch_size, masked_l1, random_cell_mask, upsample_mask

TINY = {
    "keel_tiny": dict(widths=(8, 16, 32, 64), depths=(1, 1, 1, 1), head_dim=8),
    "swin_tiny": dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
    "vit_tiny_patch4_32": dict(depth=1, dim=24, num_heads=2),
}


def _cfg(img_size: int = 64, **method) -> RunConfig:
    cfg = RunConfig()
    cfg.data.img_size = img_size
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg


def _backbone(name: str, img_size: int = 64):
    torch.manual_seed(0)
    return keel.create_model(name, img_size=img_size, **TINY[name])


def _images(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("hw,ratio", [((2, 2), 0.6), ((7, 7), 0.6), ((4, 4), 0.5), ((3, 5), 0.1)])
def test_cell_mask_count_and_determinism(hw, ratio):
    mask = random_cell_mask(6, hw, ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (6, *hw) and mask.dtype == torch.bool
    assert (mask.flatten(1).sum(1) == math.ceil(hw[0] * hw[1] * ratio)).all()   # SimMIM's count
    assert torch.equal(mask, random_cell_mask(6, hw, ratio, torch.Generator().manual_seed(0)))
    if hw == (7, 7):
        assert not torch.equal(mask, random_cell_mask(6, hw, ratio, torch.Generator().manual_seed(1)))
        assert len({tuple(m.flatten().tolist()) for m in mask}) == 6     # a mask per image


def test_each_32px_cell_maps_to_its_stem_tokens_and_pixels():
    m = SimMIM(_backbone("keel_tiny"), _cfg(mask_patch_size=32))
    assert (m.stem_stride, m.stride, m.mask_patch_size) == (4, 32, 32)
    x, cells = m.make_views(_images(n=4), torch.Generator().manual_seed(0))
    assert cells.shape == (4, 2, 2) and (cells.flatten(1).sum(1) == 3).all()   # ceil(0.6 * 4)
    tokens = upsample_mask(cells, 32 // 4)
    pixels = upsample_mask(cells, 32)
    assert tokens.shape == (4, 16, 16) and pixels.shape == (4, 64, 64)
    for b in range(4):
        for i in range(16):
            for j in range(16):  # stem token (i, j) covers pixels [4i, 4i+4) x [4j, 4j+4): cell (4i // 32, 4j // 32)
                assert tokens[b, i, j] == cells[b, (4 * i) // 32, (4 * j) // 32]
        for i in range(0, 64, 7):
            for j in range(0, 64, 5):
                assert pixels[b, i, j] == cells[b, i // 32, j // 32]


def test_default_mask_patch_size():
    assert default_mask_patch_size(224, 4) == 32     # the paper's, at the total stride
    assert default_mask_patch_size(192, 4) == 32
    assert default_mask_patch_size(224, 16) == 32    # ViT-B/16: 2 x 2 patches
    assert default_mask_patch_size(32, 4) == 8       # small images: at least 4 x 4 cells
    assert default_mask_patch_size(16, 4) == 4
    assert default_mask_patch_size(64, 6) == 12
    with pytest.raises(ValueError, match="multiple of the backbone's stem stride 4"):
        SimMIM(_backbone("swin_tiny"), _cfg(mask_patch_size=6))
    with pytest.raises(ValueError, match="keel_\\*, swin_\\* or ViT"):
        SimMIM(keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16)), _cfg())


# ---------------------------------------------------------------- masking inside the backbones
def _first_stage_input(name, backbone, x, tokens, mask_token):
    """The tokens the first block/stage receives, captured with a pre-hook."""
    seen = {}
    first = backbone.blocks[0] if name.startswith("vit") else backbone.stages[0]
    handle = first.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    backbone.forward_masked(x, tokens, mask_token)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("name", list(TINY))
def test_masked_tokens_are_replaced_at_the_masked_places_only(name):
    bb = _backbone(name).eval()
    m = SimMIM(bb, _cfg(mask_patch_size=16))
    x, cells = m.make_views(_images(n=2), torch.Generator().manual_seed(1))
    tokens = upsample_mask(cells, 16 // m.stem_stride)                       # (2, 16, 16)
    token = m.mask_token.detach()
    got = _first_stage_input(name, bb, x, tokens, token)
    if name == "keel_tiny":
        stem, got = bb.stem(x), got                                          # NCHW
        expected = torch.where(tokens[:, None], token.view(1, -1, 1, 1), stem)
    elif name == "swin_tiny":
        stem = bb.patch_embed(x)                                             # NHWC, after its norm
        expected = torch.where(tokens[..., None], token.view(1, 1, 1, -1), stem)
    else:
        patches = bb.patch_embed(x)
        expected = torch.where(tokens.view(2, -1, 1), token.view(1, 1, -1), patches) + bb.pos_embed[:, 1:]
        expected = torch.cat([bb.prefix_tokens(2), expected], 1)
    assert torch.equal(got, expected)
    # the masked forward differs from the plain one; with mask=None it is the model's own
    plain = bb.forward_masked(x)
    last = bb.feature_maps(x)[-1]
    if name == "keel_tiny":  # the final LayerNorm, applied position by position
        last = bb.norm(last.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(plain, last, atol=0, rtol=0)
    assert not torch.allclose(bb.forward_masked(x, tokens, token), plain, atol=1e-3)


# ---------------------------------------------------------------- the loss
def test_masked_l1_equals_hand_formula_and_ignores_unmasked_pixels():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    mask[1, 2:, 1:3] = True
    total = sum(abs(pred[b, c, i, j] - target[b, c, i, j]).item()
                for b in range(2) for c in range(3) for i in range(4) for j in range(4) if mask[b, i, j])
    loss = masked_l1(pred, target, mask)
    assert loss.item() == pytest.approx(total / (3 * 8), rel=1e-6)     # 8 masked pixels x 3 channels
    changed = pred.clone()
    changed[0, :, 3, 3] += 5.0                   # unmasked pixel: no change
    changed[1, 1, 0, :] -= 2.0
    assert masked_l1(changed, target, mask).item() == loss.item()
    changed[1, 2, 3, 2] += 1.0                   # a masked pixel: changes
    assert masked_l1(changed, target, mask).item() != pytest.approx(loss.item())
    assert masked_l1(pred.bfloat16(), target, mask).dtype == torch.float32


@pytest.mark.parametrize("name", ["keel_tiny", "swin_tiny"])
def test_training_step_loss_is_masked_l1_of_the_head_and_reaches_every_parameter(name):
    m = SimMIM(_backbone(name, 32), _cfg(img_size=32))
    assert m.mask_patch_size == 8
    m.train()
    x, cells = m.make_views(_images(n=4, size=32), torch.Generator().manual_seed(0))
    assert cells.shape == (4, 4, 4) and (cells.flatten(1).sum(1) == 10).all()
    out = m((x, cells))
    loss = out["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.no_grad():  # by hand: the head's image, compared on the masked 8x8 cells
        pred = m.head(m.backbone.forward_masked(x, upsample_mask(cells, 2), m.mask_token))
        pix = upsample_mask(cells, 8)
        expected = (pred - x).abs().permute(0, 2, 3, 1)[pix].sum() / (3 * pix.sum())
    assert pred.shape == x.shape
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    for pname, p in m.named_parameters():   # DDP: no parameter may be left out of the graph
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert m.mask_token.grad.abs().sum() > 0


def test_views_are_crops_only():
    m = SimMIM(_backbone("swin_tiny"), _cfg())
    vc = m.augment.cfg
    assert (vc.jitter_p, vc.gray_p, vc.blur_p) == (0.0, 0.0, 0.0)
    odd = SimMIM(_backbone("swin_tiny"), _cfg(img_size=40, mask_patch_size=16))
    with pytest.raises(ValueError, match="multiple of method.mask_patch_size 16"):
        odd.make_views(_images(size=40), torch.Generator())


def test_pretrain_smoke(make_cfg, tmp_path):
    # The trainer end to end on the smallest registered backbone SimMIM takes (keel_tiny and
    # swin_tiny have 23M and 28M parameters: their checkpoints alone make a slow test; their
    # training steps are checked above on small configs).
    from keel.jobs.pretrain import pretrain
    cfg = make_cfg("method.name=simmim", "model.name=vit_tiny_patch4_32", "data.img_size=16",
                   "train.batch_size=16", "data.subset=32", "train.max_steps=2")
    result = pretrain(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    assert (tmp_path / "run" / "backbone.safetensors").is_file()
