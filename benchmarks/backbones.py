"""Training speed of keel backbones against their timm counterparts, measured in one run.

One training step = forward + backward + one AdamW step on a batch of random images with
random labels (1000-class head). keel and timm steps are interleaved and the median is kept, so
both see the same machine state. Figures that matter are the ratios on CPU and the images/s on
a GPU.

    python benchmarks/backbones.py                                # CPU: batch 8 at 224 px
    python benchmarks/backbones.py --device cuda --batch 256 --bf16 --compile   # one GPU
    python benchmarks/backbones.py --pairs swin_tiny vit_base_patch16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import keel
from keel.models.stats import model_stats

# keel model -> timm model with the same architecture (or, for keel's own designs, the model
# of the same size class it is meant to beat).
PAIRS = {
    "keel_tiny": "swin_tiny_patch4_window7_224",
    "keel_small": "swin_small_patch4_window7_224",
    "keel_base": "swin_base_patch4_window7_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "cswin_tiny": "swin_tiny_patch4_window7_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "deit_tiny_distilled_patch16": "deit_tiny_distilled_patch16_224",
    "resnetv2_50x1_bit": "resnetv2_50x1_bit",
    "resnet18": "resnet18",
}
# Peak dense bf16 tensor throughput, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def make_step(model: nn.Module, batch: int, img_size: int, device, bf16: bool, compile_: bool):
    model = model.to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(x)
            if isinstance(out, tuple):  # distilled models return (cls, dist) logits in train mode
                out = out[0] + out[1]
            loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def median_times(steps: dict, device, warmup: int, n: int) -> dict[str, float]:
    """Median seconds per call of each step, after ``warmup`` calls (compilation, autotuning, the
    allocator); the steps take turns, so all see the same machine state."""
    for step in steps.values():
        for _ in range(warmup):
            timed(step, device)
    times = {k: [] for k in steps}
    for _ in range(n):
        for k, step in steps.items():
            times[k].append(timed(step, device))
    return {k: statistics.median(v) for k, v in times.items()}


def measure_pair(keel_name: str, timm_name: str, args, device) -> dict:
    import timm

    steps = {
        "keel": make_step(keel.create_model(keel_name, num_classes=1000, img_size=args.img_size),
                          args.batch, args.img_size, device, args.bf16, args.compile),
        "timm": make_step(timm.create_model(timm_name, pretrained=False, num_classes=1000, img_size=args.img_size)
                          if "resnet" not in timm_name else timm.create_model(timm_name, pretrained=False, num_classes=1000),
                          args.batch, args.img_size, device, args.bf16, args.compile),
    }
    med = median_times(steps, device, args.warmup, args.steps)
    st = model_stats(keel_name, img_size=args.img_size)
    row = {"keel": keel_name, "timm": timm_name, "params_m": round(st["params_m"], 2), "gmacs": round(st["gmacs"], 2),
           "keel_img_s": args.batch / med["keel"], "timm_img_s": args.batch / med["timm"],
           "time_ratio": med["keel"] / med["timm"]}
    peak = next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    if peak:  # training = 3x the forward MACs, 2 FLOPs per MAC
        row["keel_mfu"] = row["keel_img_s"] * st["gmacs"] * 6 / (peak * 1e3)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=None, help=f"keel models to measure (default: all of {list(PAIRS)})")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (median kept)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    available = set(keel.list_models())
    names = [n for n in (args.pairs or PAIRS) if n in available]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x {torch.get_num_threads()} threads"
    print(f"{where}, batch {args.batch} at {args.img_size} px, bf16={args.bf16}, compile={args.compile}, "
          f"torch {torch.__version__}")
    print("| keel model | params (M) | GMACs | keel img/s | timm model | timm img/s | keel time / timm time |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        r = measure_pair(name, PAIRS[name], args, device)
        rows.append(r)
        mfu = f" (MFU {r['keel_mfu']:.0%})" if "keel_mfu" in r else ""
        print(f"| {name} | {r['params_m']} | {r['gmacs']} | {r['keel_img_s']:.1f}{mfu} | {r['timm']} | "
              f"{r['timm_img_s']:.1f} | {r['time_ratio']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
