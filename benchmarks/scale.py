"""What FSDP buys: memory per process of ViT-B and ViT-L under DDP, FSDP and FSDP + activation
checkpointing, and (on a GPU) the largest batch each fits in and its speed.

    python benchmarks/scale.py          # CPU: 2 gloo processes per case -> results/scale.json "cpu"
    python benchmarks/scale.py --gpu    # one GPU: largest batch and img/s -> results/scale.json "gpu"

CPU part. Every case runs in its own pair of processes (``torch.distributed.run``, gloo, one
thread each), so peaks do not carry over. Each process builds SimCLR (``--method``; its projector
is 0.5M parameters, so the sizes are the backbone's: MAE's decoder would add 26M) on the ViT at
``--img`` px (64: a step is cheap; the parameters depend on the size only through the position
table, 17 vs 197 tokens x width, 0.16% of ViT-B; the JSON has the count at 224 px too) and
trains it for two steps with keel's own :class:`~keel.engine.trainer.Trainer` (``train.parallel``,
``train.activation_checkpointing``; no run directory, so nothing is written to disk). A hook
records, on every rank after the first optimizer step, the bytes this process holds of the
parameters (``parallel.local_numel``), gradients and AdamW state (local shards under FSDP), and
after the last step the peak resident memory. Two peaks, because imports, the digits data and
building the full model (FSDP shards a copy of it) cost memory too:

* peak RSS: the process's high-water mark from its start to the end of the second step
  (ru_maxrss before ``fit``, then the kernel's VmHWM, reset just before ``fit``);
* rise: the high-water mark of ``fit`` alone minus the resident memory just before it: what
  wrapping, the steps and the optimizer added. Under FSDP it is net of the caller's full weights,
  which ``fit`` gives back (they were resident before it).

Every case runs twice: with glibc's malloc as it comes, and with ``MALLOC_MMAP_THRESHOLD_=131072``.
glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which blocks
of a ViT's weight sizes come from the heap and freed ones stay resident; FSDP gathers and frees
every block's weights each step, so under the default the heap keeps growing with freed memory.
With the threshold fixed, every tensor over 128 kB is its own mapping, given back when freed: the
rise is then what the live tensors need.

Under FSDP the caller's task gives up its parameter storage for the run (``parallel.shard``), so
the model is not counted twice; the hook checks that the caller's copy holds 0 bytes. Under DDP
the process also keeps DDP's gradient buckets (a copy of the gradients, not counted in "grads").

GPU part (one process; not run on the CPU): for ViT-B/L/H (ViT-H/14: width 1280, 32 blocks) under
ddp (one process: no wrapper), fsdp (one shard: all of it, with bf16 weights gathered per block)
and fsdp + activation checkpointing, the largest global batch of SimCLR (``--method``) at 224 px
that trains in bf16: doubling from 32, then bisecting to within 1/8, each try two steps of the
real Trainer on a batch of random images resident on the GPU (one step an epoch), an
out-of-memory error meaning "does not fit". Then img/s at that batch (``--steps`` timed steps
after two). Each (model, mode) runs in its own process within ``--case-timeout`` (150 s); nine
cases can take longer than one 10-minute command: split them with ``--models``, the JSON keeps
every finished case. Without CUDA, ``--gpu`` prints "not measured: no GPU" and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "scale.json"
SELF = "benchmarks/scale.py"

# name -> (keel model, overrides of its config)
MODELS = {
    "ViT-B": ("vit_base_patch16", {}),
    "ViT-L": ("vit_large_patch16", {}),
    "ViT-H": ("vit_large_patch14", {"dim": 1280, "depth": 32, "num_heads": 16}),   # ViT-H/14
}
# mode -> (train.parallel, train.activation_checkpointing)
MODES = {"ddp": ("ddp", False), "fsdp": ("fsdp", False), "fsdp+ac": ("fsdp", True)}
MB = 1e6


ALLOCATORS = {"glibc": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def overrides(method: str, mode: str, img: int, batch: int, device: str, steps: int) -> list[str]:
    parallel_, ac = MODES[mode]
    return ["data.source=digits", f"data.img_size={img}", "data.num_workers=0", f"method.name={method}",
            f"train.parallel={parallel_}", f"train.activation_checkpointing={str(ac).lower()}",
            f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.epochs={steps}",
            "train.knn_every=0", "train.log_every=1", f"train.device={device}"]


def build(name: str, cfg):
    """``cfg.method.name`` on the named ViT, as ``keel pretrain`` builds it (seeded the same)."""
    from keel.config import override
    from keel.jobs.pretrain import build_pretraining
    model, extra = MODELS[name]
    return build_pretraining(override(cfg, {"model.name": model}), **extra)[0]


def count_params(name: str, img: int) -> int:
    """Backbone parameters at ``img`` px, built on the meta device (no memory)."""
    from keel.models.registry import create_model
    model, extra = MODELS[name]
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(model, img_size=img, **extra).parameters())


def local_bytes(tensors) -> int:
    """Bytes of this process's part of ``tensors`` (the local shard of a DTensor)."""
    from keel.engine.parallel import local_tensor
    total = 0
    for t in tensors:
        if torch.is_tensor(t):
            t = local_tensor(t)
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- CPU: memory
def _status() -> dict[str, int]:
    """VmRSS and VmHWM (the high-water mark) of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux


def cpu_worker(args) -> None:
    from keel.config import load_config
    from keel.data.sources import training_data
    from keel.engine import distributed as D
    from keel.engine import parallel
    from keel.engine.hooks import Hook
    from keel.engine.trainer import Trainer
    torch.set_num_threads(1)
    D.init_distributed("cpu")
    cfg = load_config(None, overrides(args.method, args.mode, args.img, args.batch, "cpu", 2))
    data = training_data("digits", args.img, subset=args.batch * 4)
    method = build(args.model, cfg)
    rec: dict = {"rank": D.rank(), "model": args.model, "mode": args.mode,
                 "task_params": sum(p.numel() for p in method.parameters()),
                 "backbone_params": sum(p.numel() for p in method.export_backbone().parameters())}

    class Probe(Hook):
        def before_train(self, trainer) -> None:
            # wrapped and the optimizer built, no step taken: what setting up cost
            rec["setup_rss"], rec["setup_hwm"] = _status()["VmRSS"], _status()["VmHWM"]

        def after_step(self, trainer) -> None:
            if trainer.step == 1:
                task = trainer.task
                rec["param_bytes"] = parallel.local_numel(task) * 4
                rec["grad_bytes"] = local_bytes(p.grad for p in task.parameters())
                rec["optim_bytes"] = local_bytes(v for s in trainer.optimizer.state.values() for v in s.values())
                # the caller's copy: the same module under DDP, emptied under FSDP
                rec["caller_bytes"] = 0 if task is method else local_bytes(method.parameters())
                rec["train_hwm_step1"] = _status()["VmHWM"]
            rec["train_hwm"] = _status()["VmHWM"]
            rec["loss"] = trainer.history["loss"][-1][1] if trainer.history["loss"] else None

    gc.collect()
    rec["peak_before_fit"] = _maxrss()       # imports, data, the full model
    rec["rss_before_fit"] = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                          # reset the high-water mark: the training window alone
    t0 = time.perf_counter()
    Trainer(cfg, None, quiet=True).fit(method, data, [Probe()])
    rec["fit_s"] = round(time.perf_counter() - t0, 1)
    rec["peak_rss"] = max(rec["peak_before_fit"], rec["train_hwm"])
    rec["rise"] = rec["train_hwm"] - rec["rss_before_fit"]
    Path(args.out).write_text(json.dumps(rec))
    D.barrier()


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _need(params: int, mode: str) -> int:
    """A generous guess of the bytes both processes need: DDP holds weights, gradients, buckets and
    two AdamW moments (20 bytes a parameter); FSDP builds the full model, copies it to shard it and
    holds half of the rest. Plus about 1 GB of torch and data per process."""
    per_param = 20 if mode == "ddp" else 14
    return 2 * (per_param * int(params * 1.1) + 1_000_000_000)


def run_case(args, name: str, mode: str, allocator: str) -> dict:
    """Both processes of one case; their records, or why there are none."""
    case: dict = {"allocator": allocator}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SELF,
               "--worker", "--model", name, "--mode", mode, "--method", args.method, "--img", str(args.img),
               "--batch", str(args.batch), "--out", f"{tmp}/rank%d.json"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(OMP_NUM_THREADS="1", **ALLOCATORS[allocator])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        case["wall_s"] = round(time.perf_counter() - t0, 1)
        shown = " ".join(f"{k}={v}" for k, v in ALLOCATORS[allocator].items())
        case["command"] = (shown + " " if shown else "") + "OMP_NUM_THREADS=1 python " + \
            " ".join(cmd[1:]).replace(f"{tmp}/", "TMP/")
        if proc.returncode:
            case["failed"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            print(f"{name} {mode} {allocator}: failed\n{proc.stderr[-3000:]}", flush=True)
        else:
            case["ranks"] = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(2)]
            print(f"{name} {mode} {allocator}: {case['wall_s']} s", flush=True)
    return case


def cpu_main(args) -> None:
    date = datetime.datetime.now().isoformat(timespec="seconds")
    command = " ".join(["python", SELF, *sys.argv[1:]])
    cases, started = [], time.perf_counter()
    for name in args.models:
        params, at224 = count_params(name, args.img), count_params(name, 224)
        for mode in args.modes:
            case = {"model": name, "keel_model": MODELS[name][0], "mode": mode,
                    "backbone_params_at_img": params, "backbone_params_at_224": at224, "runs": []}
            for allocator in args.malloc:
                need, free = _need(params, mode), _mem_available()
                if need > free and not args.force:
                    why = f"needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free (--force runs it)"
                    print(f"{name} {mode} {allocator}: skipped, {why}", flush=True)
                    case["runs"].append({"allocator": allocator, "skipped": why})
                else:
                    case["runs"].append(run_case(args, name, mode, allocator))
            cases.append(case)
    table = cpu_table(cases, args.malloc)
    print(table)
    save("cpu", {"date": date, "machine": "2-core CPU (shared)", "torch": torch.__version__,
                 "python": sys.version.split()[0], "command": command,
                 "wall_s": round(time.perf_counter() - started, 1),
                 "setup": f"{args.method}, {args.img} px, global batch {args.batch} ({args.batch // 2} images a "
                          "process), 2 gloo processes, one thread each, fp32, AdamW; sizes after the first "
                          "optimizer step, peaks over fit up to the end of the second; max over the two ranks",
                 "columns": {"peak RSS": "the process's high-water mark from its start (imports, data, full "
                                         "model) to the end of the second step",
                             "rise": "high-water mark during fit minus the resident memory just before fit",
                             "glibc / mmap": "glibc malloc as it comes / MALLOC_MMAP_THRESHOLD_=131072"},
                 "cases": cases, "table": table})


def _top(run: dict) -> dict[str, int] | None:
    if "ranks" not in run:
        return None
    keys = ("param_bytes", "grad_bytes", "optim_bytes", "peak_rss", "rise")
    return {k: max(r[k] for r in run["ranks"]) for k in keys}


def cpu_table(cases: list[dict], allocators: list[str]) -> str:
    """One row per (model, mode); what depends on the allocator as ``glibc / mmap``."""
    def mb(x: int | None) -> str:
        return "-" if x is None else f"{x / MB:,.0f}"

    def ratio(x: int | None, base: int | None) -> str:
        return "-" if x is None or not base else f"{x / base:.2f}"

    def each(values) -> str:
        return " / ".join(values)
    names = " / ".join(allocators)
    rows = [f"| model | mode | params MB/rank | grads MB/rank | optimizer MB/rank | state vs DDP | "
            f"peak RSS MB/rank ({names}) | peak vs DDP | rise MB/rank ({names}) | rise vs DDP |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base: dict[str, tuple] = {}
    for c in cases:
        tops = [_top(r) for r in c["runs"]]
        first = next((t for t in tops if t), None)
        if first is None:
            why = next((r.get("skipped") or r.get("failed") for r in c["runs"]), "")
            rows.append(f"| {c['model']} | {c['mode']} | {why} | | | | | | | |")
            continue
        state = first["param_bytes"] + first["grad_bytes"] + first["optim_bytes"]
        peaks = [t["peak_rss"] if t else None for t in tops]
        rises = [t["rise"] if t else None for t in tops]
        if c["mode"] == "ddp":
            base[c["model"]] = (state, peaks, rises)
        b_state, b_peaks, b_rises = base.get(c["model"], (None, [None] * len(tops), [None] * len(tops)))
        rows.append(f"| {c['model']} | {c['mode']} | {mb(first['param_bytes'])} | {mb(first['grad_bytes'])} | "
                    f"{mb(first['optim_bytes'])} | {ratio(state, b_state)} | {each(map(mb, peaks))} | "
                    f"{each(map(ratio, peaks, b_peaks))} | {each(map(mb, rises))} | "
                    f"{each(map(ratio, rises, b_rises))} |")
    return "\n".join(rows)


def save(key: str, value: dict) -> None:
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc[key] = value
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")


# ----------------------------------------------------------------------------- GPU: largest batch
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def gpu_try(name: str, method_name: str, mode: str, batch: int, steps: int, warm: int = 2) -> dict:
    """``steps`` steps of the Trainer at ``batch`` (224 px, bf16): peak GiB, img/s after
    ``warm`` steps, or ``oom``."""
    from keel.config import load_config
    from keel.data.builtins import InMemoryImages
    from keel.engine.hooks import Hook
    from keel.engine.trainer import Trainer
    times: list[float] = []

    class Clock(Hook):
        def after_step(self, trainer) -> None:
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    out: dict = {"batch": batch}
    try:
        cfg = load_config(None, overrides(method_name, mode, 224, batch, "cuda", steps))
        # one batch of random images, one step an epoch: resident data costs one batch of uint8
        data = InMemoryImages(torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8))
        torch.cuda.reset_peak_memory_stats()
        with torch.device("cuda"):                      # initialise the weights on the GPU: fast
            method = build(name, cfg)
        Trainer(cfg, None, quiet=True).fit(method, data, [Clock()])
        out["ok"] = True
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        if len(times) > warm:
            out["img_s"] = round(batch * (len(times) - warm) / (times[-1] - times[warm - 1]), 1)
    except Exception as e:  # noqa: BLE001 - an OOM is an answer; anything else is reported too
        out["ok"] = False
        out["oom" if _is_oom(e) else "error"] = True if _is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}"
    method = data = None  # noqa: F841 - drop the references before freeing the cache
    gc.collect()
    torch.cuda.empty_cache()
    return out


def gpu_worker(args) -> None:
    """Doubling then bisection for one (model, mode); prints a line per try and the result."""
    def attempt(b: int) -> bool:
        r = gpu_try(args.model, args.method, args.mode, b, 2)
        print("TRY " + json.dumps(r), flush=True)
        if r.get("error"):
            raise SystemExit(f"failed at batch {b}: {r['error']}")
        return r["ok"]

    lo, hi, b = 0, None, args.start
    while b <= args.max_batch:
        if attempt(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    while hi is not None and hi - lo > max(8, lo // 8):
        mid = (lo + hi) // 2 // 8 * 8
        if mid <= lo:
            break
        lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
    res = {"model": args.model, "method": args.method, "mode": args.mode, "largest_batch": lo, "first_oom": hi,
           "capped": hi is None}
    if lo:
        res["speed"] = gpu_try(args.model, args.method, args.mode, lo, 2 + args.steps)
    print("RESULT " + json.dumps(res), flush=True)


def gpu_case(args, name: str, mode: str) -> dict:
    """One (model, mode) in its own process, within ``--case-timeout``: its result, or what its
    tries showed before it failed or ran out of time."""
    cmd = [sys.executable, SELF, "--gpu-worker", "--model", name, "--mode", mode, "--method", args.method,
           "--start", str(args.start), "--max-batch", str(args.max_batch), "--steps", str(args.steps)]
    why = None
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.case_timeout)
        stdout = proc.stdout
        if proc.returncode:
            why = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        why = f"ran past {args.case_timeout} s"
    lines = stdout.splitlines()
    tries = [json.loads(line[4:]) for line in lines if line.startswith("TRY ")]
    result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
    case = {"model": name, "mode": mode, "tries": tries}
    if result is not None:
        case.update(result)
    elif any(t["ok"] for t in tries):      # cut short: the largest batch that ran, a lower bound
        case["largest_batch"] = max(t["batch"] for t in tries if t["ok"])
    if why:
        case["failed"] = why
    return case


def gpu_main(args) -> None:
    if not torch.cuda.is_available():
        print("not measured: no GPU")
        return
    date = datetime.datetime.now().isoformat(timespec="seconds")
    rows = ["| model | mode | largest batch | peak GiB | img/s |", "|---|---|---:|---:|---:|"]
    cases = []
    for name in args.models:
        for mode in args.modes:
            case = gpu_case(args, name, mode)
            cases.append(case)
            speed, batch = case.get("speed", {}), case.get("largest_batch")
            if batch is None:
                shown = "failed: " + case.get("failed", "?")
            else:
                shown = f"{batch}{'+ (the cap)' if case.get('capped') else ''}" + \
                    (f" or more ({case['failed']})" if case.get("failed") else "")
            rows.append(f"| {name} | {mode} | {shown} | {speed.get('peak_gib', '')} | {speed.get('img_s', '')} |")
            print(rows[-1], flush=True)
            save("gpu", {"date": date, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "method": args.method, "command": " ".join(["python", SELF, *sys.argv[1:]]),
                         "cases": cases, "table": "\n".join(rows)})
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="largest batch and img/s on one GPU")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                    help="CPU default: ViT-B ViT-L; GPU default: ViT-B ViT-L ViT-H")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--method", default="simclr", help="the SSL method trained (default simclr: a small head)")
    ap.add_argument("--malloc", nargs="+", choices=list(ALLOCATORS), default=list(ALLOCATORS),
                    help="CPU: glibc's malloc as it comes, with a fixed mmap threshold, or both")
    ap.add_argument("--img", type=int, default=64, help="CPU image size (parameters hardly depend on it)")
    ap.add_argument("--batch", type=int, default=4, help="CPU global batch (two processes)")
    ap.add_argument("--force", action="store_true", help="CPU: run a case even when memory looks short")
    ap.add_argument("--start", type=int, default=32, help="GPU: first batch tried")
    ap.add_argument("--max-batch", type=int, default=8192, help="GPU: largest batch tried")
    ap.add_argument("--steps", type=int, default=5, help="GPU: timed steps at the largest batch")
    ap.add_argument("--case-timeout", type=int, default=150, help="GPU: seconds for one (model, mode)")
    # internal: one process of a case
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gpu-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.out = args.out % int(os.environ["RANK"])
        cpu_worker(args)
    elif args.gpu_worker:
        gpu_worker(args)
    elif args.gpu:
        args.models = args.models or ["ViT-B", "ViT-L", "ViT-H"]
        gpu_main(args)
    else:
        args.models = args.models or ["ViT-B", "ViT-L"]
        cpu_main(args)


if __name__ == "__main__":
    main()
