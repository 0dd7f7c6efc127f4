"""``keel shards SRC OUT``: convert a folder or a CSV of images into WebDataset tar shards,
a thin layer over :func:`keel.data.shards_write.write_shards`."""
from __future__ import annotations

import argparse
import os

SHARDS_EPILOG = """\
sources: a folder of images (labeled when every image sits in one of at least 2 class sub-folders;
--labeled/--unlabeled decide instead), with a .txt of the same stem beside each image for captions
(a/b.jpg + a/b.txt); or a CSV with an image column (image, path or file; paths relative to the CSV),
an optional label column (one class name per row) and an optional text (or caption) column.

OUT gets shard-000000.tar, ... (per sample: KEY.jpg, KEY.cls for labels, KEY.txt for captions,
KEY.json with the source path and stored size), index.json (counts per shard, the class list) and
dropped.txt (the files that could not be read, with the reason). Images are re-encoded as JPEG with
the shorter side at most --max-side (never upscaled). The same source and settings give
byte-identical shards whatever --workers is. A killed conversion, run again with the same
arguments, continues where it stopped; a finished one is left as it is.

examples:
  keel shards photos/ shards/photos                       # class sub-folders -> labeled shards
  keel shards pairs.csv shards/pairs --max-side 384 --per-shard 2000
  keel shards raw/ shards/raw --unlabeled --exclude raw-duplicates.txt --workers 8"""


def add_parser(sub, fmt=argparse.RawDescriptionHelpFormatter) -> argparse.ArgumentParser:
    p = sub.add_parser("shards", help="convert a folder or CSV of images into WebDataset tar shards",
                       description="Convert images (a folder, a labeled CSV, or image+text pairs) into "
                                   "WebDataset tar shards for fast training.",
                       epilog=SHARDS_EPILOG, formatter_class=fmt)
    p.add_argument("src", metavar="SRC", help="a folder of images or a .csv file")
    p.add_argument("out", metavar="OUT", help="output folder for the shards")
    p.add_argument("--max-side", type=int, default=256,
                   help="the shorter side of a stored image is at most this (default: 256, for 224-px training)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-100 (default: 90)")
    p.add_argument("--per-shard", type=int, default=1000, help="source images per shard (default: 1000)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--labeled", dest="labeled", action="store_true", default=None,
                       help="labels from class sub-folders (or the CSV's label column); error if there are none")
    group.add_argument("--unlabeled", dest="labeled", action="store_false",
                       help="store no labels even where class sub-folders or a label column exist")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--exclude", metavar="FILE",
                   help="a text file of paths to leave out, one per line (absolute or relative to SRC)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep the source's order (default: a fixed random order, so no shard holds one class)")
    return p


def cmd_shards(args) -> int:
    from keel.data.shards_write import write_shards

    res = write_shards(args.src, args.out, max_side=args.max_side, quality=args.quality,
                       per_shard=args.per_shard, labeled=args.labeled, workers=args.workers,
                       exclude=args.exclude, progress=True, shuffle=args.shuffle)
    run = res["run"]
    if run["up_to_date"]:
        return 0
    out = os.path.abspath(args.out)
    mb_out = sum(s["bytes"] for s in res["shards"]) / 1e6
    rate = run["converted"] / run["seconds"] if run["seconds"] > 0 else 0.0
    what = "labeled " if res["classes"] else ""
    what += "image+text " if res["text"] else ""
    classes = f" of {len(res['classes'])} classes" if res["classes"] else ""
    dropped = (f"{res['dropped']} dropped (listed in {os.path.join(out, 'dropped.txt')})" if res["dropped"]
               else "0 dropped")
    excluded = f", {run['excluded']} excluded" if run["excluded"] else ""
    print(f"wrote {res['count']} {what}images{classes} in {len(res['shards'])} shards to {out}; {dropped}"
          f"{excluded}; {mb_out:.1f} MB out from {run['bytes_in'] / 1e6:.1f} MB in; {rate:.0f} images/s")
    return 0
