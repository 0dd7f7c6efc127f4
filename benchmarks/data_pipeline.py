"""The data pipeline's figures (issue 25), measured in one run on the CPU.

    python benchmarks/data_pipeline.py --phase speed      # views/s per core: old folder, new folder, shards
    python benchmarks/data_pipeline.py --phase startup    # a 200,000-file folder: seconds to the first step
    python benchmarks/data_pipeline.py --phase memory     # resident memory after each epoch

speed: 200 photo-like 1024x768 JPEGs (skimage's photos, upscaled; quality 90) decoded and batched
(what the CPU does per image when training on a GPU: keel makes the views there), and the same
plus two 224-px training views per image on the CPU (random resized crop + flip; colour ops
excluded: the same in every path), one thread, no workers, so the figures are per core. "keel 0.1 folder" is the path before this change (decode at full size,
resize + centre crop, crops inside the square); "folder" decodes the whole image at 256 px
(reduced-size JPEG decoding); "shards" reads ``keel shards`` output (default --max-side 256).
The conversion's throughput (one process) and the shards' size against the folder come from the
same run. Results go to benchmarks/results/data_pipeline.json (merged by phase).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from keel.data.folders import ImageFolder, collate_skip
from keel.data.views import BatchAugment, ViewConfig

RESULTS = Path(__file__).parent / "results" / "data_pipeline.json"


def make_photos(folder: Path, n: int = 200) -> Path:
    """n 1024x768 JPEGs from skimage's colour photos (upscaled, every other one mirrored)."""
    import skimage.data as sd
    folder.mkdir(parents=True, exist_ok=True)
    photos = [getattr(sd, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "cat",
                                                "immunohistochemistry", "hubble_deep_field")]
    for i in range(n):
        im = Image.fromarray(photos[i % len(photos)]).resize((1024, 768), Image.Resampling.BICUBIC)
        if i % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im.save(folder / f"{i:04d}.jpg", quality=90)
    return folder


def _per_s(batches, augment: BatchAugment | None, seconds: float = 8.0) -> float:
    """Images/s through decode + collate (+ two views with ``augment``), over whole passes of
    ``batches()`` until ``seconds`` have gone by."""
    g = torch.Generator().manual_seed(0)
    for _ in batches():     # warm: imports, page cache
        break
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for batch in batches():
            if augment is not None:
                augment(batch["images"], g, batch.get("sizes"))
                augment(batch["images"], g, batch.get("sizes"))
            n += len(batch["images"])
    return n / (time.perf_counter() - t0)


def phase_speed(work: Path, seconds: float) -> dict:
    from keel.data.shards import ShardSource
    from keel.data.shards_write import write_shards
    torch.set_num_threads(1)
    photos = make_photos(work / "photos")
    augment = BatchAugment(ViewConfig(size=224, jitter_p=0.0, gray_p=0.0, blur_p=0.0))

    def folder(whole: bool):
        ds = ImageFolder(photos, img_size=224, whole=whole)
        return lambda: (collate_skip([ds[i] for i in range(k, min(k + 32, len(ds)))]) for k in range(0, len(ds), 32))

    t0 = time.perf_counter()
    index = write_shards(photos, work / "shards", workers=1, progress=False)
    convert_s = time.perf_counter() - t0
    src = ShardSource(f"shards:{work / 'shards'}", img_size=224, shuffle_buffer=256)
    epochs = iter(range(10 ** 6))

    def shards():
        return src.stream(next(epochs), 0, 32, 0, 0, 1, torch.device("cpu"), num_workers=0)

    paths = {"keel 0.1 folder": folder(False), "folder": folder(True), "shards": shards}
    # on a GPU the views are made there: the CPU's part is decode + batch
    decode = {k: _per_s(f, None, seconds) for k, f in paths.items()}
    views = {k: _per_s(f, augment, seconds) for k, f in paths.items()}   # CPU-only training
    size_in = sum(p.stat().st_size for p in photos.iterdir())
    size_out = sum(s["bytes"] for s in index["shards"])
    out = {"decoded_img_per_s_per_core": {k: round(v, 1) for k, v in decode.items()},
           "with_two_views_img_per_s_per_core": {k: round(v, 1) for k, v in views.items()},
           "decode_folder_vs_old": round(decode["folder"] / decode["keel 0.1 folder"], 2),
           "decode_shards_vs_old": round(decode["shards"] / decode["keel 0.1 folder"], 2),
           "views_folder_vs_old": round(views["folder"] / views["keel 0.1 folder"], 2),
           "views_shards_vs_old": round(views["shards"] / views["keel 0.1 folder"], 2),
           "conversion_img_per_s_per_core": round(len(list(photos.iterdir())) / convert_s, 1),
           "shards_mb": round(size_out / 1e6, 2), "folder_mb": round(size_in / 1e6, 2),
           "size_ratio": round(size_out / size_in, 3)}
    return out


def _seconds_to_first_step(args: list[str], run: Path) -> float:
    """Wall seconds from starting ``keel pretrain`` to its first logged step (then it is stopped)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    try:
        while not (metrics.is_file() and metrics.stat().st_size > 0):
            if proc.poll() is not None:
                raise RuntimeError(f"keel pretrain ended ({proc.returncode}) before its first step")
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        while not (run / "checkpoints" / "last.pt").is_file() and proc.poll() is None:
            time.sleep(0.05)         # let the first checkpoint land: the resumed run starts from it
        return seconds
    finally:
        proc.terminate()
        proc.wait()


def phase_startup(work: Path, n: int = 200_000) -> dict:
    """A folder of n files (hard links to 200 photos, 100 sub-folders, so also a labeled folder the
    kNN monitor uses): seconds from ``keel pretrain`` (default settings but a small model) to its
    first step, on a first run and on a resumed one that reads the cached file list."""
    photos = make_photos(work / "photos")
    big = work / "big"
    per = n // 100
    for d in range(100):
        (big / f"d{d:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(per):
            os.link(photos / f"{(d * per + i) % 200:04d}.jpg", big / f"d{d:03d}" / f"{i:05d}.jpg")
    args = [sys.executable, "-m", "keel", "pretrain", f"data.source={big}", "data.img_size=32", "train.batch_size=32",
            "model.name=resnet10_cifar", "train.log_every=1", "train.ckpt_every=1"]
    run = work / "run"
    first = _seconds_to_first_step(args + ["--out", str(run)], run)
    (run / "metrics.jsonl").unlink()
    resumed = _seconds_to_first_step(args + ["--resume", str(run)], run)
    return {"files": n, "first_run_s": round(first, 1), "resumed_s": round(resumed, 1),
            "file_list_mb": round((run / "files.json").stat().st_size / 1e6, 2)}


def phase_memory(work: Path, epochs: int = 6) -> dict:
    """Resident memory after each epoch of a pretraining run on a folder (the loop builds each
    epoch's batches anew; nothing may pile up)."""
    from keel.config import load_config
    from keel.data.sources import training_data
    from keel.engine.hooks import Hook
    from keel.engine.trainer import Trainer
    from keel.jobs.pretrain import build_pretraining
    photos = make_photos(work / "photos")
    rss = []

    class Rss(Hook):
        def after_epoch(self, trainer):
            rss.append(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20)

    cfg = load_config(None, [f"data.source={photos}", "data.img_size=32", "train.batch_size=50", f"train.epochs={epochs}",
                             "model.name=resnet10_cifar", "train.knn_every=0", "data.num_workers=2"])
    data = training_data(cfg.data.source, cfg.data.img_size, file_list=work / "mem" / "files.json")
    method, cfg = build_pretraining(cfg)
    Trainer(cfg, work / "mem", quiet=True).fit(method, data, hooks=[Rss()])
    return {"epochs": epochs, "rss_mb_after_each_epoch": [round(r, 1) for r in rss],
            "growth_mb_after_first": round(rss[-1] - rss[0], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=["speed", "startup", "memory"], default="speed")
    ap.add_argument("--seconds", type=float, default=8.0, help="speed: seconds per path")
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="keel-data-bench-"))
    try:
        result = {"speed": lambda: phase_speed(work, args.seconds), "startup": lambda: phase_startup(work),
                  "memory": lambda: phase_memory(work)}[args.phase]()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result.update(date=time.strftime("%Y-%m-%d"), machine="2-core CPU", torch=torch.__version__,
                  command=f"python benchmarks/data_pipeline.py --phase {args.phase}")
    print(json.dumps(result, indent=1))
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    saved[args.phase] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
