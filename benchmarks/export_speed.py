"""ONNX Runtime against eager PyTorch on the CPU: latency at batch 1 and throughput at batch 64, for
the hybrid (keel_tiny) and ViT-S/16, in one run.

Each model's embedding is exported with ``keel.deploy.export`` (torch.export -> ONNX, checked
against the eager model at once: the script stops if the file is not the same computation), then
eager PyTorch (``torch.inference_mode``, fp32) and an ONNX Runtime CPU session (all graph
optimisations, ``--threads`` intra-op threads, like torch) take turns on the same random batch;
the median of ``--steps`` calls is kept. Ratios are eager time / ONNX Runtime time (above 1: ONNX
Runtime is faster).

    python benchmarks/export_speed.py                      # 224 px, batches 1 and 64, all cores
    python benchmarks/export_speed.py --threads 1 --steps 20
    python benchmarks/export_speed.py --quick              # tiny steps: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from backbones import median_times  # noqa: E402

import keel  # noqa: E402
from keel.deploy.export import Embedding, export_module  # noqa: E402

MODELS = {"hybrid": "keel_tiny", "vit_s": "vit_small_patch16"}
RESULT = Path(__file__).parent / "results" / "export_speed.json"


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(name: str, args, workdir: Path) -> dict:
    torch.manual_seed(0)
    module = Embedding(keel.create_model(name, img_size=args.img_size)).eval()
    t0 = time.perf_counter()
    report = export_module(module, workdir / f"{name}.onnx", "onnx", args.img_size, ["embedding"], card={"model": name})
    export_s = time.perf_counter() - t0
    session = ort_session(report.path, args.threads)
    feed = session.get_inputs()[0].name
    row = {"model": name, "params_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 2),
           "export_s": round(export_s, 1), "max_rel_error": report.max_rel_error, "batches": {}}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.img_size, args.img_size)
        xn = x.numpy()

        def eager():
            with torch.inference_mode():
                module(x)

        def onnxruntime():
            session.run(None, {feed: xn})
        med = median_times({"eager": eager, "onnxruntime": onnxruntime}, torch.device("cpu"), args.warmup, args.steps)
        row["batches"][batch] = {
            "eager_ms": round(med["eager"] * 1e3, 2), "onnxruntime_ms": round(med["onnxruntime"] * 1e3, 2),
            "eager_img_s": round(batch / med["eager"], 1), "onnxruntime_img_s": round(batch / med["onnxruntime"], 1),
            "eager_over_onnxruntime": round(med["eager"] / med["onnxruntime"], 3)}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and ONNX Runtime threads")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per engine and batch (median kept)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="tiny steps (64 px, batches 1 and 4, 2 calls): checks the script, measures nothing")
    ap.add_argument("--json", help="write the result here (default: benchmarks/results/export_speed.json; "
                                   "--quick writes nothing unless given)")
    args = ap.parse_args()
    if args.quick:
        args.img_size, args.batches, args.steps, args.warmup = 64, [1, 4], 2, 1
    torch.set_num_threads(args.threads)
    import onnxruntime

    where = f"CPU x {args.threads} threads"
    print(f"ONNX Runtime {onnxruntime.__version__} vs eager torch {torch.__version__}: {where}, "
          f"{args.img_size} px, fp32, batches {args.batches}, median of {args.steps}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            rows[key] = measure(MODELS[key], args, Path(tmp))
            print(f"  {MODELS[key]}: exported and checked in {rows[key]['export_s']} s "
                  f"(max rel. error {rows[key]['max_rel_error']:.1e})")
    print("| model | batch | eager ms | ONNX Runtime ms | eager img/s | ONNX Runtime img/s | eager / ORT time |")
    print("|---|---|---|---|---|---|---|")
    for row in rows.values():
        for batch, b in row["batches"].items():
            print(f"| {row['model']} | {batch} | {b['eager_ms']} | {b['onnxruntime_ms']} | {b['eager_img_s']} | "
                  f"{b['onnxruntime_img_s']} | {b['eager_over_onnxruntime']} |")
    result = {"benchmark": "ONNX Runtime vs eager PyTorch (CPU)", "script": "benchmarks/export_speed.py",
              "device": where, "torch": str(torch.__version__), "onnxruntime": onnxruntime.__version__,
              "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "args": vars(args), "rows": rows}
    out = Path(args.json) if args.json else (None if args.quick else RESULT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
