"""MoCo v3: the contrastive term against a hand-written cross-entropy, its 2T scaling, the heads,
the momentum update, the frozen ViT patch embedding, 2 processes == 1 process (gathered keys),
and one real training run.

lightly has no MoCo v3 loss to compare with: its ``NTXentLoss`` with ``memory_bank_size=0`` is
SimCLR's (2N - 1 candidates per anchor, both views as negatives), and with a memory bank it puts
the positive in front of negatives drawn from the bank only. MoCo v3 scores each query against
exactly the N keys of the batch, the positive being one of them, so it is checked against the
formula written out instead.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import keel
from keel.config import RunConfig
from keel.engine import distributed as D
from keel.engine.optim import build_optimizer
from keel.tasks.ssl import build_method
from keel.tasks.ssl.mocov3 import MoCoV3, contrastive_loss

WORLD = 2
BATCH = 8  # images per view in the combined batch; each rank holds BATCH // WORLD


# ---------------------------------------------------------------- the loss
def _ctr_by_hand(q, k, t: float) -> float:
    """2T * mean_i -log(exp(cos(q_i, k_i)/T) / sum_j exp(cos(q_i, k_j)/T))."""
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    total = 0.0
    for i, qi in enumerate(q):
        den = sum(math.exp(cos(qi, kj) / t) for kj in k)
        total += -math.log(math.exp(cos(qi, k[i]) / t) / den)
    return 2 * t * total / len(q)


def test_ctr_matches_the_formula_written_out():
    q = [(3.0, 4.0, 0.0), (-1.0, 0.5, 2.0), (0.2, -2.0, 1.0)]
    k = [(1.0, 2.0, -1.0), (0.3, 0.1, 1.0), (-2.0, -1.0, 0.5)]
    for t in (0.2, 0.5, 1.0):
        got = contrastive_loss(torch.tensor(q), torch.tensor(k), t).item()
        assert got == pytest.approx(_ctr_by_hand(q, k, t), rel=1e-6, abs=1e-6), t
    # asymmetric: queries and keys play different roles
    a, b = torch.tensor(q), torch.tensor(k)
    assert contrastive_loss(a, b, 0.2).item() != pytest.approx(contrastive_loss(b, a, 0.2).item(), abs=1e-4)


def test_ctr_is_cross_entropy_times_two_t():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for t in (0.1, 0.2, 0.7):
        logits = nn.functional.normalize(q, dim=1) @ nn.functional.normalize(k, dim=1).T / t
        ce = nn.functional.cross_entropy(logits, torch.arange(6))
        assert contrastive_loss(q, k, t).item() == pytest.approx(2 * t * ce.item(), rel=1e-6)
    # closed form: orthonormal queries equal to their keys -> each row sees its positive at
    # cosine 1 and n - 1 keys at cosine 0: 2T log(1 + (n - 1) e^(-1/T))
    n, t = 4, 0.2
    eye = torch.eye(n) * 3.0
    expected = 2 * t * math.log(1 + (n - 1) * math.exp(-1 / t))
    assert contrastive_loss(eye, eye.clone(), t).item() == pytest.approx(expected, rel=1e-5)


def test_ctr_gives_no_gradient_to_keys_and_the_right_one_to_queries():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(q, k, 0.3)
    gq, gk = torch.autograd.grad(loss, (q, k), allow_unused=True)
    assert gk is None  # keys come from the momentum encoder: no gradient
    qn, kn = q / q.norm(dim=1, keepdim=True), (k / k.norm(dim=1, keepdim=True)).detach()
    ref = -torch.log_softmax(qn @ kn.T / 0.3, dim=1).diagonal().mean() * 0.6
    (gr,) = torch.autograd.grad(ref, q)
    torch.testing.assert_close(gq.double(), gr, atol=1e-6, rtol=1e-5)


def test_ctr_is_float32_under_autocast():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    ref = contrastive_loss(q, k, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(q, k, 0.2)
    assert got.dtype == torch.float32
    # a bf16 matmul would be off by ~1e-2 here
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    assert contrastive_loss(q.bfloat16(), k.bfloat16(), 0.2).dtype == torch.float32


# ---------------------------------------------------------------- the method
def _cfg(img_size: int = 16) -> RunConfig:
    cfg = RunConfig()
    cfg.data.img_size = img_size
    cfg.method.proj_hidden_dim = 32
    cfg.method.proj_dim = 16
    cfg.method.pred_hidden_dim = 24
    return cfg


def _vit(img_size: int = 16):
    return keel.create_model("vit_tiny_patch4_32", img_size=img_size, depth=2, dim=48, num_heads=3)


def _resnet():
    return keel.create_model("resnet10_cifar", widths=(8, 8, 16, 16))


def _build(backbone=None, cfg=None):
    return MoCoV3(backbone if backbone is not None else _vit(), cfg or _cfg())


def test_defaults_and_head_layout():
    with torch.device("meta"):  # the 4096-wide defaults, without allocating them
        m = MoCoV3(_vit(), RunConfig())
    assert m.temperature == 0.2 and m.base_momentum == 0.99
    proj, pred = m.projector, m.predictor
    kinds = [type(x).__name__ for x in proj]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert [(x.in_features, x.out_features) for x in proj if isinstance(x, nn.Linear)] == \
        [(48, 4096), (4096, 4096), (4096, 256)]
    assert all(x.bias is None for x in proj if isinstance(x, nn.Linear))
    assert proj[1].affine and proj[4].affine and not proj[7].affine  # last BN without affine
    assert [type(x).__name__ for x in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (256, 4096, 256)
    assert pred[1].affine and not pred[4].affine
    cfg = _cfg()
    cfg.method.temperature, cfg.method.momentum = 0.5, 0.9
    m = build_method("mocov3", _vit(), cfg)
    assert isinstance(m, MoCoV3) and m.temperature == 0.5 and m.base_momentum == 0.9
    assert m.projector[0].out_features == 32 and m.predictor[0].out_features == 24 and m.predictor[3].out_features == 16


def test_training_step_at_init_uses_online_projections_as_keys():
    # At step 0 the momentum encoder equals the online one, so the keys are the online
    # projections: loss = ctr(pred(z1), z2) + ctr(pred(z2), z1) from the online network alone.
    torch.manual_seed(0)
    m = _build()
    m.train()
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    loss = m((x1, x2))["loss"]
    with torch.no_grad():
        z1, z2 = m.projector(m.backbone.embed(x1)), m.projector(m.backbone.embed(x2))
        ref = contrastive_loss(m.predictor(z1), z2, 0.2) + contrastive_loss(m.predictor(z2), z1, 0.2)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert 0 < loss.item() < 2 * 2 * 0.2 * (math.log(8) + 2 / 0.2)
    loss.backward()
    for name, p in m.named_parameters():
        if name.startswith("momentum_") or name.startswith("backbone.patch_embed"):
            assert not p.requires_grad and p.grad is None, name  # EMA targets, frozen embedding
        else:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.predictor[0].weight.grad.abs().sum() > 0 and m.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_momentum_update_is_exact_and_follows_the_cosine(check_ema):
    torch.manual_seed(0)
    m = _build(_resnet())  # a backbone with BatchNorm buffers
    step, total = 2, 10
    # the momentum of step + 1 (the official code updates at the start of the next step)
    mom = 1 - (1 - 0.99) * (math.cos(math.pi * (step + 1) / total) + 1) / 2
    assert m.momentum_at(step + 1, total) == pytest.approx(mom, abs=1e-12)
    old, new = check_ema(m, [("momentum_backbone.", "backbone."), ("momentum_projector.", "projector.")],
                         mom, step, total)
    # lightly's update on the same tensors agrees
    utils = pytest.importorskip("lightly.models.utils")
    ref = _build(_resnet())
    ref.load_state_dict(old)
    utils.update_momentum(ref.backbone, ref.momentum_backbone, mom)
    for (name, a), b in zip(m.momentum_backbone.named_parameters(), ref.momentum_backbone.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    # the last step's momentum is 1: the key encoder no longer moves
    before = [p.clone() for p in m.momentum_projector.parameters()]
    m.on_step_end(total - 1, total)
    assert all(torch.equal(a, b) for a, b in zip(before, m.momentum_projector.parameters()))


def test_vit_patch_embedding_is_frozen_and_stays_fixed():
    torch.manual_seed(0)
    m = _build()
    assert m.frozen_patch_embed
    frozen = {id(p) for p in m.backbone.patch_embed.parameters()}
    assert len(frozen) == 2  # weight and bias of the projection
    assert all(not p.requires_grad for p in m.backbone.patch_embed.parameters())
    assert all(not p.requires_grad for p in m.momentum_backbone.patch_embed.parameters())
    opt = build_optimizer("adamw", m, lr=0.1, weight_decay=0.1)
    assert not frozen & {id(p) for g in opt.param_groups for p in g["params"]}
    w0 = m.backbone.patch_embed.proj.weight.clone()
    blk0 = m.backbone.blocks[0].attn.qkv.weight.clone()
    m.train()
    m((torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)))["loss"].backward()
    opt.step()
    m.on_step_end(0, 10)
    assert torch.equal(m.backbone.patch_embed.proj.weight, w0)
    assert torch.equal(m.momentum_backbone.patch_embed.proj.weight, w0)
    assert not torch.equal(m.backbone.blocks[0].attn.qkv.weight, blk0)  # the rest trains
    # a backbone without a patch embedding is left whole
    r = _build(_resnet())
    assert not r.frozen_patch_embed and all(p.requires_grad for p in r.backbone.parameters())


def test_make_views_are_two_reproducible_augmentations():
    m = _build()
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x1, x2 = m.make_views(images, torch.Generator().manual_seed(3))
    assert x1.shape == x2.shape == (4, 3, 16, 16) and not torch.equal(x1, x2)
    y1, y2 = m.make_views(images, torch.Generator().manual_seed(3))
    assert torch.equal(x1, y1) and torch.equal(x2, y2)


# ---------------------------------------------------------------- 2 processes == 1 process
def _bn_eval(module: nn.Module) -> None:
    # CPU/gloo has no SyncBatchNorm: in training mode each rank's BN would see half the batch.
    # Eval mode (a fixed per-sample map) in both runs isolates the gathered keys and DDP.
    for mod in module.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.eval()


def _shard(x: torch.Tensor, r: int, w: int) -> torch.Tensor:
    n = len(x) // w
    return x[r * n:(r + 1) * n]


def _worker(task: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    info = D.init_distributed("cpu")
    r, w = info.rank, info.world_size
    inp = torch.load(task / "inputs.pt", weights_only=True)
    method = _build()
    method.load_state_dict(inp["method"])
    method.train()
    _bn_eval(method)
    ddp = DDP(method)
    x1, x2 = inp["views"]
    loss = ddp((_shard(x1, r, w), _shard(x2, r, w)))["loss"]
    loss.backward()
    out = {"loss": loss.detach(), "grads": {k: p.grad.clone() for k, p in method.named_parameters()
                                             if p.grad is not None}}
    # a second step: DDP fails at the next forward if a trained parameter got no gradient
    method.zero_grad(set_to_none=True)
    method.on_step_end(0, 10)
    ddp((_shard(x2, r, w), _shard(x1, r, w)))["loss"].backward()
    out["second_step_ok"] = True
    torch.save(out, task / f"rank{r}.pt")
    D.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, launch_workers):
    torch.manual_seed(0)
    method = _build()
    g = torch.Generator().manual_seed(1)
    views = (torch.randn(BATCH, 3, 16, 16, generator=g), torch.randn(BATCH, 3, 16, 16, generator=g))
    torch.save({"method": method.state_dict(), "views": views}, tmp_path / "inputs.pt")
    results = launch_workers(__file__, tmp_path, WORLD)

    method.train()
    _bn_eval(method)
    ref_loss = method(views)["loss"]
    ref_loss.backward()
    ref = {k: p.grad for k, p in method.named_parameters() if p.grad is not None}
    losses = [res["loss"].item() for res in results]
    assert losses[0] != losses[1]  # each rank's loss is over its own queries
    assert sum(losses) / WORLD == pytest.approx(ref_loss.item(), abs=1e-6)
    for res in results:
        assert res["second_step_ok"]
        assert set(res["grads"]) == set(ref)
        for name, g_ref in ref.items():
            # relative to the tensor's scale: the class token's tiny init makes its gradient a
            # sum of large terms that cancel (see tests/engine/test_distributed.py)
            err = (res["grads"][name] - g_ref).abs().max().item()
            assert err <= 1e-6 + 1e-5 * g_ref.abs().max().item(), (name, err)
    assert all(torch.equal(results[0]["grads"][k], results[1]["grads"][k]) for k in ref)


# ---------------------------------------------------------------- the real trainer
def test_pretrain_smoke(make_cfg, tmp_path):
    from keel.jobs.pretrain import pretrain
    cfg = make_cfg("method.name=mocov3", "train.max_steps=2", "method.proj_hidden_dim=32",
                   "method.proj_dim=16", "method.pred_hidden_dim=32")
    result = pretrain(cfg, run_dir=tmp_path / "run", quiet=True)
    assert result["steps"] == 2 and math.isfinite(result["loss"])
    assert (tmp_path / "run" / "backbone.safetensors").is_file()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
