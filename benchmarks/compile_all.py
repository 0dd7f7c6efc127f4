"""Does every keel model work under torch.compile? Forward + backward, compiled vs eager.

For each registered model (or those named), build a small instance of the family at a small
input size, run one training step eagerly and compiled from the same weights, and compare the
outputs and gradients. A model that fails to compile or disagrees is reported, not hidden.

    python benchmarks/compile_all.py                  # every model, CPU (inductor + C++)
    python benchmarks/compile_all.py --device cuda keel_tiny swin_tiny
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import keel

# Input size per family: a multiple of the total stride that keeps CPU compilation quick.
SIZES = {"vit_tiny_patch4_32": 32, "resnet10_cifar": 32, "resnet18_cifar": 32, "resnetv2_26x1_cifar": 32}


def check(name: str, device, size: int, dtype) -> tuple[bool, str]:
    torch.manual_seed(0)
    kw = {} if name in SIZES else {"img_size": size}
    model = keel.create_model(name, num_classes=10, **kw).to(device, dtype).train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, size, size, device=device, dtype=dtype)

    def step(m, fwd):
        out = fwd(x)
        out = out[0] + out[1] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
        return out.detach(), [p.grad for p in m.parameters() if p.grad is not None]

    torch.manual_seed(1)
    ref_out, ref_grads = step(model, model)
    torch.manual_seed(1)
    out, grads = step(twin, torch.compile(twin))
    err = (out - ref_out).abs().max().item() / (ref_out.abs().max().item() + 1e-12)
    # relative to the largest gradient anywhere: a zero-initialised gamma has exactly-zero
    # gradients upstream in eager mode and ~1e-9 compiled, which a per-tensor ratio would blow up
    scale = max(r.abs().max().item() for r in ref_grads) + 1e-12
    gerr = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)) / scale
    ok = err < 1e-3 and gerr < 1e-2
    return ok, f"output rel err {err:.1e}, grad rel err {gerr:.1e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="default: every registered model except the largest sizes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--float64", action="store_true",
                    help="compare in float64: separates a wrong graph from float32 reordering noise "
                         "(weight standardization + GroupNorm gradients differ ~1e-2 in fp32)")
    args = ap.parse_args()
    device = torch.device(args.device)
    skip_big = ("large", "x3", "x4", "152x2", "101x")  # same code as their smaller siblings
    names = args.models or [n for n in keel.list_models() if not any(s in n for s in skip_big)]
    failures = 0
    for name in names:
        t = time.perf_counter()
        size = SIZES.get(name, args.size)
        try:
            ok, msg = check(name, device, size, torch.float64 if args.float64 else torch.float32)
        except Exception as e:  # report and go on: the point is the full list
            ok, msg = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:<32} {msg}  ({time.perf_counter() - t:.0f} s)", flush=True)
    print(f"{len(names) - failures} of {len(names)} models compile and agree with eager")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
