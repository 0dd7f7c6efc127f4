"""CLIP's and SigLIP's losses against open_clip's on the same inputs, and 2 processes = 1."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from keel.tasks.clip_losses import MAX_LOGIT_SCALE, ClipLoss, SigLipLoss


def _features(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(n, d, generator=g), dim=1)
    return img, txt


def test_initial_temperatures_and_clamp():
    c, s = ClipLoss(), SigLipLoss()
    assert math.isclose(c.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    assert math.isclose(s.logit_scale.exp().item(), 10.0, rel_tol=1e-6) and s.logit_bias.item() == -10.0
    with torch.no_grad():
        c.logit_scale.fill_(7.0)
        s.logit_scale.fill_(7.0)
    c.clamp_()
    s.clamp_()
    assert c.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE) == s.logit_scale.item()
    assert math.isclose(MAX_LOGIT_SCALE, math.log(100))


def test_clip_hand_computed_two_pairs():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = ClipLoss(init_scale=1.0)(img, txt)["loss"]
    # rows: image 0 -> [1, .6] target 0; image 1 -> [0, .8] target 1; texts are the columns
    ce = lambda row, t: -row[t] + math.log(sum(math.exp(v) for v in row))
    want = (ce([1, .6], 0) + ce([0, .8], 1)) / 2 / 2 + (ce([1, 0], 0) + ce([.6, .8], 1)) / 2 / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_open_clip(local_loss):
    open_clip = pytest.importorskip("open_clip")
    img, txt = _features()
    ours = ClipLoss(local_loss=local_loss)
    with torch.no_grad():
        ours.logit_scale.fill_(math.log(20.0))
    a_img, a_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = ours(a_img, a_txt)["loss"]
    loss.backward()
    b_img, b_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(math.log(20.0), requires_grad=True)
    ref = open_clip.ClipLoss(local_loss=local_loss)(b_img, b_txt, scale.exp())
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a_img.grad, b_img.grad)
    torch.testing.assert_close(a_txt.grad, b_txt.grad)
    torch.testing.assert_close(ours.logit_scale.grad, scale.grad)


def test_siglip_loss_matches_open_clip():
    open_clip = pytest.importorskip("open_clip")
    img, txt = _features(seed=1)
    ours = SigLipLoss()
    a_img, a_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = ours(a_img, a_txt)["loss"]
    loss.backward()
    b_img, b_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    ref = open_clip.loss.SigLipLoss(rank=0, world_size=1)(b_img, b_txt, scale.exp(), bias)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a_img.grad, b_img.grad)
    torch.testing.assert_close(a_txt.grad, b_txt.grad)
    torch.testing.assert_close(ours.logit_scale.grad, scale.grad)
    torch.testing.assert_close(ours.logit_bias.grad, bias.grad)


def test_matched_pairs_lower_the_loss():
    img, txt = _features()
    shuffled = txt[torch.randperm(len(txt), generator=torch.Generator().manual_seed(0))]
    for loss in (ClipLoss(), SigLipLoss()):
        assert loss(img, img)["loss"] < loss(img, txt)["loss"] < loss(img, shuffled)["loss"]


# ------------------------------------------------------------------ two processes = one
KINDS = ("clip", "clip_local", "siglip")


def _make(kind):
    return {"clip": lambda: ClipLoss(), "clip_local": lambda: ClipLoss(local_loss=True), "siglip": SigLipLoss}[kind]()


def _grads(kind, img, txt):
    """loss, feature grads, and the temperature parameters' grads."""
    mod = _make(kind)
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = mod(img, txt)["loss"]
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad,
            "params": [p.grad for p in mod.parameters()]}


def _worker(task: Path) -> None:
    from keel.engine import distributed as D
    info = D.init_distributed("cpu")
    img, txt = torch.load(task / "inputs.pt", weights_only=True)
    n = len(img) // info.world_size
    rows = slice(info.rank * n, (info.rank + 1) * n)
    out = {kind: _grads(kind, img[rows], txt[rows]) for kind in KINDS}
    torch.save(out, task / f"rank{info.rank}.pt")
    # leave the group together: a process that exits while gloo's threads still talk to its peer aborts
    D.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, launch_workers):
    img, txt = _features(n=8)
    torch.save((img, txt), tmp_path / "inputs.pt")
    results = launch_workers(__file__, tmp_path)
    for kind in KINDS:
        one = _grads(kind, img, txt)
        # what DDP does: the loss logged and the gradients are the mean over the processes
        loss = sum(r[kind]["loss"] for r in results) / 2
        torch.testing.assert_close(loss, one["loss"])
        torch.testing.assert_close(torch.cat([r[kind]["img"] for r in results]) / 2, one["img"])
        torch.testing.assert_close(torch.cat([r[kind]["txt"] for r in results]) / 2, one["txt"])
        for k, g in enumerate(one["params"]):
            torch.testing.assert_close(sum(r[kind]["params"][k] for r in results) / 2, g)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
