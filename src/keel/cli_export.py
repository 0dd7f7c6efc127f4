"""``keel export`` and ``keel predict``: using a trained model outside training, a thin layer over
:mod:`keel.deploy.export` and :mod:`keel.deploy.predict`."""
from __future__ import annotations

import argparse

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


def add_parsers(sub, fmt=argparse.RawDescriptionHelpFormatter) -> None:
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
