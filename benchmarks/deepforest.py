"""keel's promise on real aerial photos: does self-supervised pretraining on a team's own
unlabeled images beat random init when a detector is fine-tuned on a few hundred tree crowns?

Data: deepforest 2.1.0's wheel ships four aerial images with 951 labeled crowns (Pascal VOC XML)
and two unlabeled photos (``pip download deepforest==2.1.0 --no-deps`` and unzip; deepforest is
never imported). ``prepare`` splits them so that no test crown is seen in training:

* the two large NEON Yellowstone scenes (2299 x 2472, 574 crowns; 1249 x 1035, 279 crowns) are
  cut at 60% of their width: the left part is training, the right part test; a crown crossing the
  cut belongs to neither (it is dropped, and counted);
* the two 400 x 400 images from other sites (OSBS, Florida: 61 crowns; SOAP, California: 37,
  labeled Alive/Dead) are held out whole, for testing only;
* every label becomes ``Tree`` (one class: SOAP's Alive/Dead are trees too);
* the unlabeled images for pretraining are 64 px crops of the *training* regions only (a grid with
  stride 32) and of the two unlabeled photos (SOAP_031, a 400 x 400 aerial image, and a
  1058 x 997 drone photo of a lake shore), no test region.

``run`` then trains, for each seed, the same detector from two starting points at the same budget:

* ``simclr``: ``keel pretrain method.name=simclr model.name=resnet18`` on the unlabeled crops (made
  once, seed 0), then ``keel detect train model.backbone=<that run>``;
* ``random``: ``keel detect train model.backbone=random:resnet18``.

Detection: Faster R-CNN with ViTDet's heads over an FPN of ResNet-18, 64 pyramid channels, 192 px
tiles with 64 px overlap (larger than nearly every crown), large-scale jitter 0.5-1.5, AdamW lr
0.04 per 256 at batch 8, no layer decay (a random backbone should not be held back), on the CPU.
Test AP is COCO's box AP on the test tiles, with TIDE's error breakdown.

    python benchmarks/deepforest.py prepare --wheel-data /tmp/deepforest/whl/deepforest/data --work /tmp/dfb
    python benchmarks/deepforest.py run --work /tmp/dfb --seeds 0 1 2

Results: ``benchmarks/results/deepforest.json``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "deepforest.json"
LARGE = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop")
OTHER_SITES = ("OSBS_029", "SOAP_061")
UNLABELED = ("SOAP_031.png", "AWPE Pigeon Lake 2020 DJI_0005.JPG")
CUT = 0.6
CROP, STRIDE = 64, 32
DETECT = ["data.tile=192", "data.tile_overlap=64", "aug.img_size=192", "aug.scale_min=0.5", "aug.scale_max=1.5",
          "model.out_channels=64", "train.batch_size=8", "train.lr=0.04", "train.layer_decay=1.0",
          "train.eval_every=0", "train.device=cpu"]
PRETRAIN = ["method.name=simclr", "model.name=resnet18", "data.img_size=64", "train.batch_size=128",
            "train.knn_every=0", "train.device=cpu", "train.seed=0"]


def prepare(wheel_data: Path, work: Path) -> dict:
    from PIL import Image
    from keel.data.decode import load_image
    from keel.detection.annotations import read_annotations
    ann = read_annotations(wheel_data)                       # the folder of VOC files
    images, unlabeled = work / "images", work / "unlabeled"
    images.mkdir(parents=True, exist_ok=True)
    unlabeled.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "test": []}
    stats = {"crossing_dropped": 0}
    n_crops = 0

    def crops_of(im, name):
        nonlocal n_crops
        for y in range(0, im.height - CROP + 1, STRIDE):
            for x in range(0, im.width - CROP + 1, STRIDE):
                im.crop((x, y, x + CROP, y + CROP)).save(unlabeled / f"{name}-{y}-{x}.png")
                n_crops += 1

    for rec in ann.records:
        stem = Path(rec.image_path).stem
        im = load_image(rec.image_path)
        boxes = rec.boxes.tolist()
        if stem in LARGE:
            xs = int(CUT * rec.width)
            for part, window in (("train", (0, 0, xs, rec.height)), ("test", (xs, 0, rec.width, rec.height))):
                path = images / f"{stem}-{part}.png"
                region = im.crop(window)
                region.save(path)
                for x0, y0, x1, y1 in boxes:
                    inside = x1 <= xs if part == "train" else x0 >= xs
                    if inside:
                        rows[part].append([path.name, x0 - window[0], y0, x1 - window[0], y1, "Tree"])
                if part == "train":
                    crops_of(region, stem)
            stats["crossing_dropped"] += sum(1 for x0, _, x1, _ in boxes if x0 < xs < x1)
        elif stem in OTHER_SITES:
            path = images / f"{stem}.png"
            im.save(path)
            rows["test"] += [[path.name, *b, "Tree"] for b in boxes]
    for name in UNLABELED:
        crops_of(load_image(wheel_data / name), Path(name).stem.replace(" ", "_"))
    for part, items in rows.items():
        with open(images / f"{part}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_path", "xmin", "ymin", "xmax", "ymax", "label"])
            w.writerows(items)
        stats[f"{part}_boxes"] = len(items)
        stats[f"{part}_images"] = len({r[0] for r in items})
    stats["unlabeled_crops"] = n_crops
    (work / "split.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats))
    return stats


def keel(args: list[str]) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "keel", *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed: keel {' '.join(args)}\n{p.stderr[-3000:]}")
    return round(time.perf_counter() - t, 1)


def run(work: Path, seeds: list[int], epochs: int, pretrain_epochs: int, out: Path) -> None:
    data = json.loads(out.read_text()) if out.exists() else {}
    data.update(date=datetime.date.today().isoformat(), machine="2-core CPU",
                split=json.loads((work / "split.json").read_text()))
    ssl = work / "runs" / "simclr"
    args = ["pretrain", *PRETRAIN, f"data.source={work / 'unlabeled'}", f"train.epochs={pretrain_epochs}",
            "--out", str(ssl)]
    if not (ssl / "backbone.safetensors").is_file():
        data["pretrain"] = {"command": "keel " + " ".join(args), "wall_s": keel(args)}
    data.setdefault("pretrain", {"command": "keel " + " ".join(args)})
    runs = data.setdefault("runs", {})
    for seed in seeds:
        for arm, spec in (("random", "random:resnet18"), ("simclr", str(ssl))):
            run_dir = work / "runs" / f"detect-{arm}-{seed}"
            args = ["detect", "train", f"data.source={work / 'images' / 'train.csv'}",
                    f"data.test_source={work / 'images' / 'test.csv'}", f"model.backbone={spec}", *DETECT,
                    f"train.epochs={epochs}", f"train.seed={seed}", "--out", str(run_dir)]
            wall = keel(args)
            res = json.loads((run_dir / "result.json").read_text())
            f = res["final"]
            runs[f"{arm}|{seed}"] = {"command": "keel " + " ".join(args), "wall_s": wall, "steps": res["steps"],
                                     "AP": f["AP"], "AP50": f["AP50"], "AP75": f["AP75"],
                                     "dAP": f["errors"]["dAP"], "counts": f["errors"]["counts"]}
            print(arm, seed, {k: round(f[k], 1) for k in ("AP", "AP50", "AP75")}, f"{wall} s", flush=True)
            out.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


def table(data: dict) -> str:
    def stat(xs):
        return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"
    lines = ["| start | AP | AP50 | AP75 | seeds |", "|---|---|---|---|---|"]
    for arm in ("random", "simclr"):
        rs = [v for k, v in data["runs"].items() if k.startswith(arm + "|")]
        if rs:
            lines.append(f"| {arm} | {stat([r['AP'] for r in rs])} | {stat([r['AP50'] for r in rs])} | "
                         f"{stat([r['AP75'] for r in rs])} | {len(rs)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["prepare", "run", "table"])
    p.add_argument("--wheel-data", type=Path, help="prepare: deepforest's data/ folder (from the unzipped wheel)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dfb"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8, help="detection epochs (the same for both starts)")
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    if a.step == "prepare":
        if a.wheel_data is None:
            raise SystemExit("prepare needs --wheel-data PATH (deepforest's data/ folder)")
        prepare(a.wheel_data, a.work)
    elif a.step == "run":
        run(a.work, a.seeds, a.epochs, a.pretrain_epochs, a.out)
    else:
        print(table(json.loads(a.out.read_text())))


if __name__ == "__main__":
    main()
