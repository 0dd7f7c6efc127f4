"""MAE pretraining speed: keel's MAE against the same model built from timm's ViT, in one run.

One training step = MAE's forward (75% of the patches hidden, the encoder sees the rest, an
8-block 512-wide decoder draws every patch), the masked normalized-pixel loss, backward and one
AdamW step, on a batch of random images at 224 px. The baseline is the plain recipe the issue
names: timm's ``vit_base_patch16_224`` as the encoder (its patch embedding, position table,
blocks and norm, run on the kept patches only) and a decoder of timm ``Block``s; both models
share the loss code, so the ratio is the models' and the framework's. keel and timm steps are
interleaved and the median kept. Before timing, the two must be the same computation: with the
timm model's weights copied into keel's they give the same loss on the same images and masks, and
their FLOPs per image (``FlopCounterMode``, attention counted as its matmuls) agree.
MFU = FLOPs/image x images/s over the device's dense bf16 peak.

    python benchmarks/mae_speed.py                                            # CPU: ratio only
    python benchmarks/mae_speed.py --device cuda --batch 256 --bf16 --compile # one GPU: img/s, MFU
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from backbones import PEAK_TFLOPS, median_times  # noqa: E402

import keel  # noqa: E402
from keel.config import load_config  # noqa: E402
from keel.convert import from_timm  # noqa: E402
from keel.tasks.ssl import build_method  # noqa: E402
from keel.tasks.ssl.mae import masked_mse, normalize_patches, num_kept, patchify, random_masking, sincos_pos_embed  # noqa: E402


class TimmMAE(nn.Module):
    """MAE on timm's ViT: the baseline (MAE's reference layout, timm's encoder and blocks)."""

    def __init__(self, img_size: int, mask_ratio: float, dec_dim: int, dec_depth: int, dec_heads: int):
        super().__init__()
        import timm
        from timm.models.vision_transformer import Block
        self.enc = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=img_size)
        self.p, D = 16, self.enc.embed_dim
        self.grid = img_size // self.p
        self.keep = num_kept(self.grid ** 2, mask_ratio)
        self.mask_ratio, self.decoder_shape = mask_ratio, (dec_dim, dec_depth, dec_heads)
        self.dec_embed = nn.Linear(D, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        pos = torch.cat([torch.zeros(1, dec_dim), sincos_pos_embed(dec_dim, self.grid, self.grid)])
        self.register_buffer("dec_pos", pos.unsqueeze(0), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)  # MAE's decoder blocks (timm's default is 1e-5)
        self.dec_blocks = nn.Sequential(*[Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                          for _ in range(dec_depth)])
        self.dec_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.dec_pred = nn.Linear(dec_dim, self.p ** 2 * 3)

    def forward(self, views) -> dict:
        x, noise = views
        kept, restore, mask = random_masking(noise, self.keep)
        t = self.enc.patch_embed(x) + self.enc.pos_embed[:, 1:]
        t = t.gather(1, kept.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        cls = (self.enc.cls_token + self.enc.pos_embed[:, :1]).expand(len(t), -1, -1)
        t = self.enc.norm(self.enc.blocks(torch.cat([cls, t], dim=1)))
        t = self.dec_embed(t)
        B, K, E = t[:, 1:].shape
        d = torch.cat([t[:, 1:], self.mask_token.to(t.dtype).expand(B, restore.shape[1] - K, E)], dim=1)
        d = d.gather(1, restore.unsqueeze(-1).expand(-1, -1, E))
        d = torch.cat([t[:, :1], d], dim=1) + self.dec_pos.to(t.dtype)
        pred = self.dec_pred(self.dec_norm(self.dec_blocks(d)))[:, 1:]
        target = normalize_patches(patchify(x.float(), self.p))[0]
        return {"loss": masked_mse(pred, target, mask)}


def keel_mae(img_size: int, mask_ratio: float, dec_dim: int, dec_depth: int, dec_heads: int) -> nn.Module:
    cfg = load_config(overrides=["method.name=mae", f"method.mask_ratio={mask_ratio}",
                                 f"method.decoder_dim={dec_dim}", f"method.decoder_depth={dec_depth}",
                                 f"method.decoder_heads={dec_heads}", "method.norm_pix_loss=true"])
    return build_method("mae", keel.create_model("vit_base_patch16", img_size=img_size), cfg)


def same_loss(timm_model: TimmMAE, views) -> tuple[float, float]:
    """(keel's loss, timm's loss) on the same images and masks, keel's MAE given the timm model's
    weights (the encoder through keel's timm conversion): equal when the two compute the same thing."""
    dec = {"embed": timm_model.dec_embed, "blocks": timm_model.dec_blocks, "norm": timm_model.dec_norm,
           "pred": timm_model.dec_pred}
    state = {f"backbone.{k}": v for k, v in from_timm("vit_base_patch16", timm_model.enc.state_dict()).items()}
    state["decoder.mask_token"] = timm_model.mask_token.detach()
    state.update({f"decoder.{part}.{k}": v for part, m in dec.items() for k, v in m.state_dict().items()})
    twin = keel_mae(views[0].shape[-1], timm_model.mask_ratio, *timm_model.decoder_shape)
    twin.load_state_dict(state)
    with torch.no_grad():
        return twin(views)["loss"].item(), timm_model(views)["loss"].item()


def flops_per_image(model: nn.Module, views) -> float:
    """Forward + backward FLOPs of one training step, per image (attention as plain matmuls)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(views)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(views[0])


def make_step(model: nn.Module, views, device, bf16: bool, compile_: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device.type == "cuda" or None)
    fwd = torch.compile(model) if compile_ else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(views)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--decoder", default="8x512x16", help="decoder depth x width x heads (MAE's default)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (median kept)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    depth, width, heads = (int(v) for v in args.decoder.split("x"))
    dec = dict(mask_ratio=args.mask_ratio, dec_dim=width, dec_depth=depth, dec_heads=heads)

    torch.manual_seed(0)
    models = {"keel": keel_mae(args.img_size, **dec), "timm": TimmMAE(args.img_size, **dec)}
    grid = args.img_size // 16
    small = (torch.rand(2, 3, args.img_size, args.img_size), torch.rand(2, grid * grid))
    flops = {k: flops_per_image(m, small) for k, m in models.items()}
    if abs(flops["keel"] / flops["timm"] - 1) > 0.01:
        sys.exit(f"the two models do not do the same work: {flops['keel'] / 1e9:.2f} vs "
                 f"{flops['timm'] / 1e9:.2f} GFLOPs per image")
    a, b = same_loss(models["timm"], small)
    if abs(a - b) > 1e-4 * abs(b):
        sys.exit(f"the two models disagree on the same weights: loss {a:.6f} (keel) vs {b:.6f} (timm)")
    print(f"same weights, same loss: keel {a:.6f}, timm {b:.6f}")
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in models.items()}

    views = (torch.rand(args.batch, 3, args.img_size, args.img_size, device=device),
             torch.rand(args.batch, grid * grid, device=device))
    steps = {k: make_step(m.to(device).train(), views, device, args.bf16, args.compile) for k, m in models.items()}
    img_s = {k: args.batch / t for k, t in median_times(steps, device, args.warmup, args.steps).items()}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x {torch.get_num_threads()} threads"
    peak = next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in where), None)
    print(f"MAE ViT-B/16, decoder {args.decoder}, mask {args.mask_ratio}: {where}, batch {args.batch} at "
          f"{args.img_size} px, bf16={args.bf16}, compile={args.compile}, torch {torch.__version__}")
    print("| MAE on | params (M) | GFLOPs / image (fwd+bwd) | img/s | MFU |")
    print("|---|---|---|---|---|")
    result = {"device": where, "args": vars(args), "rows": {}}
    for k in models:
        mfu = flops[k] * img_s[k] / (peak * 1e12) if peak else None
        result["rows"][k] = {"params_m": params[k], "gflops_per_image": flops[k] / 1e9, "img_s": img_s[k], "mfu": mfu}
        print(f"| {k} | {params[k]:.1f} | {flops[k] / 1e9:.1f} | {img_s[k]:.1f} | "
              f"{f'{mfu:.1%}' if mfu is not None else '—'} |")
    result["time_ratio"] = img_s["timm"] / img_s["keel"]
    print(f"keel time / timm time: {result['time_ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
