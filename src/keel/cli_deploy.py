"""The commands that use a trained model outside training, thin layers over :mod:`keel.deploy`:
``keel embed``, ``keel search``, ``keel dedup`` on a photo store (:mod:`keel.deploy.embed`,
:mod:`~keel.deploy.search`, :mod:`~keel.deploy.dedup`), ``keel predict`` and ``keel export``
(:mod:`keel.deploy.predict`, :mod:`keel.deploy.export`)."""
from __future__ import annotations

import argparse
import os


def add_parsers(sub, fmt=argparse.RawDescriptionHelpFormatter) -> None:
    _add_store_parsers(sub, fmt)
    _add_model_parsers(sub, fmt)


EMBED_EPILOG = """\
--data: a folder (every image under it, recursively), a built-in name (digits, fashion-mnist; --split
picks train or test) or shards:PATH (keel shards output, read in order). Each image is seen as
evaluation sees it: shorter side resized to the backbone's image size, centre crop, normalised.

OUT gets, per --chunk-size images: embeddings-00000.npy (float32 or float16 (n, D), L2-normalised
unless --no-normalize; numpy.load) and paths-00000.csv (column path; shards add source; pandas.read_csv),
then index.json (model, dim, count, chunks) and skipped.txt (files that could not be decoded, with
the reason). A killed run, started again with the same arguments, keeps its finished chunks and
goes on after them. Under torchrun each process embeds its own chunks.

examples:
  keel embed --checkpoint runs/my-run --data photos/ --out emb/photos
  keel embed --checkpoint timm:vit_small_patch16_224:vit_s.safetensors --data shards:shards/photos --out emb/s --dtype float16
  torchrun --nproc_per_node=4 -m keel embed --checkpoint runs/my-run --data /data/photos --out emb/all --batch-size 256"""

SEARCH_EPILOG = """\
The queries are embedded with the index's own model. Exact search reads the index block by block
(it never has to fit in memory) and keeps a running top-k; --faiss answers from an approximate
HNSW index instead (pip install faiss-cpu; built on first use, kept beside the embeddings).

Writes search.csv (query, rank, path, similarity) and search.png (per query, first column, its hits
with their similarity) into --out (default: the index folder).

examples:
  keel search --index emb/photos --query photos/beach/0001.jpg
  keel search --index emb/photos --query new-photos/ -k 5 --out results/
  keel search --index emb/all --query probe.jpg -k 50 --faiss"""

DEDUP_EPILOG = """\
Every pair of images with cosine similarity >= --threshold is found (exactly, block by block); groups
are the connected components of those pairs. Writes groups.csv (group, size, path, keep, similarity to
the kept image), dedup.png (the largest groups) and drop.txt (every image of a group but the first in
path order) into --out (default: the index folder). drop.txt is an exclusion list: keel shards
--exclude takes it. The threshold depends on the model: look at dedup.png, and at search similarities
of images you know are copies; 0.95 is a start for a trained backbone.

examples:
  keel dedup --index emb/photos --threshold 0.95
  keel dedup --index emb/photos --threshold 0.9 --out dedup/ --show 16
  keel dedup --index emb/raw --threshold 0.95 && keel shards raw/ shards/raw --exclude emb/raw/drop.txt"""


def _add_store_parsers(sub, fmt) -> None:
    e = sub.add_parser("embed", help="embeddings of every image of a folder or of shards, in chunks",
                       description="Embed every image of a folder, a built-in dataset or keel shards with a "
                                   "trained backbone, into .npy chunks with the path of each image.",
                       epilog=EMBED_EPILOG, formatter_class=fmt)
    e.add_argument("--checkpoint", required=True,
                   help="a run directory, a backbone.safetensors with its card.json, timm:MODEL:FILE or random:MODEL")
    e.add_argument("--data", required=True, help="an image folder, a built-in name or shards:PATH")
    e.add_argument("--out", required=True, metavar="DIR", help="folder for the embeddings")
    e.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    e.add_argument("--chunk-size", type=int, default=50_000, help="images per chunk file (default: 50000)")
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="stored precision (default: float32; float16 halves the files)")
    e.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="store the raw embeddings instead of unit vectors")
    e.add_argument("--img-size", type=int, help="image side (default: the one the backbone was trained at)")
    e.add_argument("--split", choices=["train", "test"], default="train", help="built-in datasets: which split")
    e.add_argument("--workers", type=int, default=2, help="decoding processes (default: 2)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    e.add_argument("--bf16", action="store_true", help="forward in bfloat16 autocast (GPUs)")

    s = sub.add_parser("search", help="nearest neighbours of images among embeddings (cosine)",
                       description="Find the images of a keel embed folder most similar to query images.",
                       epilog=SEARCH_EPILOG, formatter_class=fmt)
    s.add_argument("--index", required=True, metavar="DIR", help="a keel embed output folder")
    s.add_argument("--query", required=True, help="an image file or a folder of images")
    s.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    s.add_argument("--out", metavar="DIR", help="folder for search.csv and search.png (default: the index folder)")
    s.add_argument("--faiss", action="store_true", help="approximate search with faiss (HNSW) instead of exact")
    s.add_argument("--show", type=int, default=8, help="queries drawn in search.png (default: 8)")
    s.add_argument("--device", default="auto", help="where queries are embedded: auto | cpu | cuda (default: auto)")

    d = sub.add_parser("dedup", help="groups of near-duplicate images, and a list of files to drop",
                       description="Find groups of near-duplicate images in a keel embed folder.",
                       epilog=DEDUP_EPILOG, formatter_class=fmt)
    d.add_argument("--index", required=True, metavar="DIR", help="a keel embed output folder")
    d.add_argument("--threshold", type=float, required=True,
                   help="cosine similarity from which two images are near-duplicates (e.g. 0.95)")
    d.add_argument("--out", metavar="DIR",
                   help="folder for groups.csv, drop.txt and dedup.png (default: the index folder)")
    d.add_argument("--show", type=int, default=8, help="groups drawn in dedup.png (default: 8)")


def cmd_embed(args) -> int:
    from keel.deploy.embed import embed
    from keel.engine.distributed import rank

    res = embed(args.checkpoint, args.data, args.out, batch_size=args.batch_size, chunk_size=args.chunk_size,
                dtype=args.dtype, normalize=args.normalize, img_size=args.img_size, split=args.split,
                device=args.device, num_workers=args.workers, amp=args.bf16)
    if rank() != 0:
        return 0
    out = os.path.abspath(args.out)
    if res["run"]["up_to_date"]:
        print(f"{out} is up to date: {res['count']} images embedded by {res['model']}")
        return 0
    run = res["run"]
    rate = run["embedded"] / run["seconds"] if run["seconds"] > 0 else 0.0
    skipped = (f"{res['skipped']} skipped (listed in {os.path.join(out, 'skipped.txt')})" if res["skipped"]
               else "0 skipped")
    print(f"embedded {res['count']} images into {len(res['chunks'])} chunks of {res['dim']}-dim {res['dtype']} "
          f"in {out}; {skipped}; {rate:.1f} images/s")
    return 0


def cmd_search(args) -> int:
    from keel.deploy.search import run_search
    from keel.engine.distributed import resolve_device

    if args.show < 0:
        raise ValueError(f"--show must be 0 or more, got {args.show}")
    res = run_search(args.index, args.query, args.k, args.out, use_faiss=args.faiss,
                     device=str(resolve_device(args.device)), show=args.show)
    for path, why in res["skipped"]:
        print(f"skipped query {path}: {why}")
    print(f"top {res['k']} of {res['queries']} queries: {res['csv']}" + (f", {res['png']}" if res["png"] else ""))
    return 0


def cmd_dedup(args) -> int:
    from keel.deploy.dedup import run_dedup

    res = run_dedup(args.index, args.threshold, args.out, show=args.show)
    groups = f"{res['groups']} group{'' if res['groups'] == 1 else 's'}"
    print(f"{groups} of near-duplicates ({res['in_groups']} of {res['count']} images, the largest {res['largest']}) "
          f"at cosine >= {args.threshold}; {res['drop']} files to drop in {res['drop_file']}"
          + (f"; pictures in {res['png']}" if res["png"] else ""))
    if res["largest"] > max(50, res["count"] // 100):
        print(f"warning: a group of {res['largest']} images is more than near-duplicates: the threshold is "
              "probably too low for this model (look at dedup.png)")
    return 0


EXPORT_EPILOG = """\
what it does: writes the model as one ONNX file (run it with ONNX Runtime, TensorRT, OpenVINO...) or
a torch.export program (.pt2: torch.export.load(path).module()), with a dynamic batch size, and
checks it at once: random batches of 1 and --batch+1 images (not the traced batch) run through
ONNX Runtime on the CPU, or through the program loaded back, must give the eager model's outputs
within 1e-4 relative error (max |exported - eager| / max |eager|). The command prints what it
checked, or fails with one line (and deletes the file).

what is exported: a fine-tune run's classifier logits (a distilled DeiT: its two heads averaged,
as its eval forward gives); a pretrained backbone's embedding (B, D); with --feature-maps, each
stage's map (features_stride4, ...). The input is one float32 tensor "image" (B, 3, S, S),
normalised as keel's evaluation does: RGB in [0, 1], then (x - 0.5) / 0.5.

beside the file: FILE.json, its card: model, image size, normalisation, output names and shapes,
the check's numbers, for a classifier its class names and softmax or sigmoid; versions.
default --out: RUN/export/<logits|embedding|feature_maps>.onnx (or .pt2).

examples:
  keel export --checkpoint runs/finetune-full-resnet18-photos-<time> --format onnx
  keel export --checkpoint runs/my-mae-run --format torch-export --feature-maps --out deploy/maps.pt2
  keel export --checkpoint random:keel_tiny --format onnx --img-size 160 --out keel_tiny.onnx"""

PREDICT_EPILOG = """\
what it does: runs a fine-tuned classifier (a keel finetune run) over a folder of images (all of
them, recursively), one image file, or a built-in dataset (its test split), and writes a CSV:
  single-label runs: path,top1,p1,...,topK,pK,error  (softmax probabilities, most probable first)
  multi-label runs:  path,labels,probabilities,error (every class whose sigmoid reaches the run's
                     task.threshold, ';'-separated, most probable first)
A file that cannot be decoded keeps its row, with the reason in the error column. Class names are
read from the run's data.source, as fine-tuning read them (numbered when it is gone).
Detection runs: use keel detect predict. default --out: RUN/predictions-<data name>.csv.

examples:
  keel predict --checkpoint runs/finetune-full-resnet18-photos-<time> --data new_photos/
  keel predict --checkpoint runs/finetune-full-keel_tiny-labels-<time> --data inbox/ -k 3 --out inbox.csv
  keel predict --checkpoint runs/<run>/classifier_best.safetensors --data digits --device cpu"""


def _add_model_parsers(sub, fmt) -> None:
    ex = sub.add_parser("export", help="export a backbone or classifier to ONNX or torch.export, checked",
                        description="Export a backbone (embedding, feature maps) or a fine-tuned classifier to "
                                    "ONNX or torch.export with a dynamic batch size, and check it against the "
                                    "eager model.",
                        epilog=EXPORT_EPILOG, formatter_class=fmt)
    ex.add_argument("--checkpoint", required=True,
                    help="a fine-tune or pretraining run directory, a .safetensors file, timm:MODEL:FILE "
                         "or random:MODEL")
    ex.add_argument("--format", required=True, choices=["onnx", "torch-export"])
    ex.add_argument("--out", metavar="FILE", help="the file to write (default: RUN/export/<what>.onnx|.pt2)")
    what = ex.add_mutually_exclusive_group()
    what.add_argument("--feature-maps", action="store_true", help="export the backbone's feature maps, one output each")
    what.add_argument("--embedding", action="store_true",
                      help="export the backbone's embedding even from a fine-tune run (default there: the logits)")
    ex.add_argument("--img-size", type=int, help="image side (default: the one the model was trained at)")
    ex.add_argument("--batch", type=int, default=2,
                    help="batch of the example input the graph is traced with, at least 2 (default: 2); "
                         "the exported model takes any batch size")

    pr = sub.add_parser("predict", help="a fine-tuned classifier's predictions on new images, as a CSV",
                        description="Predict the classes of new images with a fine-tuned classifier and "
                                    "write them to a CSV (top-k, or every label above threshold).",
                        epilog=PREDICT_EPILOG, formatter_class=fmt)
    pr.add_argument("--checkpoint", required=True, help="a keel finetune run directory or its classifier*.safetensors")
    pr.add_argument("--data", required=True, help="a folder of images, an image file or a built-in dataset")
    pr.add_argument("--out", metavar="CSV", help="the CSV to write (default: RUN/predictions-<data name>.csv)")
    pr.add_argument("-k", type=int, default=5, help="single-label: classes per image (default: 5)")
    pr.add_argument("--batch", type=int, default=64, help="images per forward pass (default: 64)")
    pr.add_argument("--num-workers", type=int, default=2, help="decoding processes (default: 2)")
    pr.add_argument("--img-size", type=int, help="image side (default: the run's)")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")


def cmd_export(args) -> int:
    from keel.deploy.export import export

    what = "feature_maps" if args.feature_maps else "embedding" if args.embedding else "auto"
    report = export(args.checkpoint, args.format, args.out, what=what, img_size=args.img_size, batch=args.batch)
    print(report.summary())
    extra = [p for p in report.files if p != report.path]
    print(f"wrote {report.path}" + (f" (+ {', '.join(str(p) for p in extra)})" if extra else "")
          + f" and its card {report.card}")
    return 0


def cmd_predict(args) -> int:
    from keel.deploy.predict import predict

    res = predict(args.checkpoint, args.data, args.out, k=args.k, batch_size=args.batch,
                  num_workers=args.num_workers, device=args.device, img_size=args.img_size)
    what = "labels above threshold" if res["kind"] == "multilabel" else f"top-{min(args.k, res['classes'])} classes"
    print(f"{res['predicted']} of {res['images']} images predicted ({what}, {res['images_per_s']:.0f} images/s)"
          + (f"; {res['skipped']} could not be decoded (listed with the reason)" if res["skipped"] else "")
          + f"\nwrote {res['out']}")
    return 0
