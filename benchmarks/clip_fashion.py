"""CLIP on a captioned Fashion-MNIST: zero-shot by prompts, retrieval, fusion, and the image tower
against SimCLR's at the same budget.

No captioned photo set ships in the packages this machine can install, so the captions are written:

* each training image gets, with probability ``--uninformative`` (default 0.2), a caption that says
  nothing about the class ("a product photo", "new arrival, item 4711"); otherwise a training
  template filled with the class name or one of its *training* synonyms, plus 0-2 non-class words
  (material, size, a colour: "cotton", "size m", "blue"); half of them also say how dark the item
  is ("dark", "mid-grey", "light": the image's mean brightness, in thirds of the training set), the
  one thing in a caption besides the class that the grey image shows;
* held out of training: 3 templates and one synonym per class. The zero-shot prompts use only the
  held-out templates, filled with the class name and the held-out synonym (averaged, re-normalised),
  so zero-shot never sees a training caption verbatim;
* retrieval: the test images captioned "a catalogue shot of the {shade} {class}." (a held-out
  template): 30 distinct captions; identical captions count as one text, answered by any of their
  images (keel's retrieval_recall), so recall needs the class and the shade right;
* fusion: label = class x colour (20 labels). Images are grey, so the colour is only in the caption
  ("a {colour} item", no class word): the image carries the class, the text the colour, each half of
  the label. Image-only can reach at most about 50%, text-only about 10%; fusion can reach both.

Reports (JSON): zero-shot top-1/top-5 on the test images vs chance (10%) and vs a linear probe on
the same image tower; retrieval recall@1/5/10 both ways; fusion vs image-only and text-only; kNN and
linear top-1 of the image tower after CLIP and after SimCLR with the same images, epochs and batch;
every figure for each of ``--seeds`` (training seeds; the captions stay the same) and their mean/std.

    python benchmarks/clip_fashion.py            # 2 CPU cores, about an hour: 15k pairs, 8 epochs, 3 seeds
    python benchmarks/clip_fashion.py --quick    # a smoke run (about 30 s): 2k pairs, 1 epoch, 1 seed
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from keel.config import load_config
from keel.data.builtins import InMemoryImages
from keel.data.pairs import PairData, PairRecords
from keel.data.sources import build_dataset
from keel.data.views import eval_transform
from keel.engine.checkpoint import load_backbone
from keel.evaluate.features import extract_features
from keel.evaluate.knn import knn_eval
from keel.evaluate.linear import accuracy_topk, linear_probe
from keel.evaluate.zeroshot import embed_dataset, embed_texts, retrieval_eval, zeroshot_weights
from keel.jobs.clip import clip_train, load_clip
from keel.jobs.pretrain import pretrain
from keel.tasks.clip_config import ClipConfig
from keel.tasks.fusion import fusion_eval

NAMES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TRAIN_SYN = [["tee", "top"], ["pants", "slacks"], ["sweater", "jumper"], ["gown", "frock"], ["jacket", "overcoat"],
             ["flip-flop", "slipper"], ["blouse", "button-down"], ["trainer", "running shoe"],
             ["handbag", "purse"], ["boot", "bootie"]]
HELD_SYN = ["tank top", "jeans", "cardigan", "sundress", "parka", "strappy sandal", "dress shirt", "sports shoe",
            "tote", "chelsea boot"]
TRAIN_TEMPLATES = ["a photo of a {}", "a {} for sale", "product picture: {}", "this {} is in stock",
                   "buy this {}", "a grey {} on a white background", "{}", "our best {}"]
HELD_TEMPLATES = ["an image of a {}.", "a catalogue shot of the {}.", "a close-up photo of a {}."]
FILLERS = ["cotton", "wool", "size m", "size l", "blue", "red", "green", "black", "slim fit", "classic",
           "summer collection", "new season"]
UNINFORMATIVE = ["a product photo", "new arrival", "item number {}", "see the details", "free shipping"]
COLOURS = ["red", "blue"]
SHADES = ["dark", "mid-grey", "light"]
RETRIEVAL_TEMPLATE = "a catalogue shot of the {}."


def shades(images: torch.Tensor, edges: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's brightness third (0 dark .. 2 light) and the edges (from the training set)."""
    mean = images.float().mean(dim=(1, 2, 3))
    if edges is None:
        edges = torch.quantile(mean, torch.tensor([1 / 3, 2 / 3]))
    return torch.bucketize(mean, edges), edges


def caption(label: int, shade: int, rng: random.Random, p_uninformative: float) -> str:
    if rng.random() < p_uninformative:
        return rng.choice(UNINFORMATIVE).format(rng.randrange(10000))
    word = rng.choice([NAMES[label], *TRAIN_SYN[label]])
    if rng.random() < 0.5:
        word = f"{SHADES[shade]} {word}"
    text = rng.choice(TRAIN_TEMPLATES).format(word)
    extra = rng.sample(FILLERS, rng.randrange(3))
    return ", ".join([text, *extra])


def image_tower_scores(backbone, train: InMemoryImages, test: InMemoryImages, size: int, epochs: int) -> dict:
    tf = lambda x: eval_transform(x, size, (0.5,) * 3, (0.5,) * 3)
    xtr, ytr = extract_features(backbone, train, tf)
    xte, yte = extract_features(backbone, test, tf)
    knn = knn_eval(xtr, ytr, xte, yte, ks=(20,))["knn_top1@20"]
    lin = linear_probe(xtr, ytr, xte, yte, num_classes=10, epochs=epochs)
    return {"knn_top1@20": knn, "linear_top1": lin.get("top1", lin.get("linear_top1"))}


def one_seed(seed: int, a, out: Path, pairs, train, test, test_shade, size: int, epochs: int, n: int,
             probe_epochs: int) -> dict:
    rng = random.Random(1000 + seed)
    common = [f"train.epochs={epochs}", "train.batch_size=256", f"train.device={a.device}", "data.num_workers=0",
              f"train.out_dir={out}", "train.log_every=5", f"train.seed={seed}"]
    result: dict = {}
    t = time.perf_counter()
    cfg = load_config(None, ["model.image=random:resnet10_cifar", f"data.img_size={size}", "model.text=text_tiny",
                             "model.embed_dim=128", "data.vocab_size=1000", "train.lr=2e-3", *common], cls=ClipConfig)
    run = clip_train(cfg, out / f"clip-{seed}", quiet=True, pairs=pairs)
    result["clip_train_s"] = round(time.perf_counter() - t, 1)
    result["clip_loss"] = run["loss"]
    task, tok = load_clip(out / f"clip-{seed}")

    # zero-shot prompts: the held-out templates x the class name, its held-out synonym, or both averaged
    feats, labels, _ = embed_dataset(task, test)
    zs = {}
    for variant, names in (("name", [NAMES]), ("held_out_synonym", [HELD_SYN]), ("both", [NAMES, HELD_SYN])):
        w = sum(zeroshot_weights(task, tok, nm, HELD_TEMPLATES) for nm in names)
        zs[variant] = accuracy_topk(feats @ torch.nn.functional.normalize(w, dim=-1).T, labels, (1, 5))
    result["zeroshot_top1"] = {k: v[1] for k, v in zs.items()}
    result["zeroshot_top5"] = {k: v[5] for k, v in zs.items()}

    rtexts = [RETRIEVAL_TEMPLATE.format(f"{SHADES[int(s)]} {NAMES[int(y)]}") for y, s in zip(test.labels, test_shade)]
    rpairs = PairRecords(rtexts, images=test.images, name="fashion-test-captions")
    result["retrieval"] = retrieval_eval(task, tok, PairData(rpairs, tok.encode(rtexts), size))

    # fusion: label = class x colour; the colour only in the caption, the class only in the image
    def fusion_split(ds, m):
        ds = ds.subset(torch.arange(min(m, len(ds))))
        colours = torch.tensor([rng.randrange(2) for _ in range(len(ds))])
        txt = embed_texts(task, tok, [f"a {COLOURS[int(c)]} item" for c in colours])
        img = embed_dataset(task, ds)[0]
        return img, txt, ds.labels * 2 + colours
    result["fusion"] = fusion_eval(fusion_split(train, 5000), fusion_split(test, 10000), 20, epochs=probe_epochs,
                                   seed=seed)

    result["clip_image_tower"] = image_tower_scores(load_backbone(out / f"clip-{seed}"), train, test, size,
                                                    probe_epochs)
    t = time.perf_counter()
    scfg = load_config(None, ["data.source=fashion-mnist", f"data.img_size={size}", f"data.subset={n}",
                              "model.name=resnet10_cifar", "method.name=simclr", "train.lr=4e-3",
                              "train.knn_every=0", "aug.scale_min=0.3", "aug.hue=0.0", *common])
    pretrain(scfg, out / f"simclr-{seed}", quiet=True)
    result["simclr_train_s"] = round(time.perf_counter() - t, 1)
    result["simclr_image_tower"] = image_tower_scores(load_backbone(out / f"simclr-{seed}"), train, test, size,
                                                      probe_epochs)
    return result


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int, default=15000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--uninformative", type=float, default=0.2)
    ap.add_argument("--out", default="runs/clip_fashion", help="run directories (default: runs/clip_fashion)")
    ap.add_argument("--json", default="benchmarks/results/clip_fashion.json", help="the result (not with --quick)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    n, epochs, n_test, probe_epochs = (2000, 1, 1000, 5) if a.quick else (a.pairs, a.epochs, 10000, 50)
    seeds = a.seeds[:1] if a.quick else a.seeds
    out = Path(a.out + ("-quick" if a.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    size = 32
    rng = random.Random(0)
    train_all = build_dataset("fashion-mnist", "train", size)
    test = build_dataset("fashion-mnist", "test", size)
    keep = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0))[:n].sort().values
    train = train_all.subset(keep)
    if n_test < len(test):
        test = test.subset(torch.arange(n_test))
    train_shade, edges = shades(train.images)
    test_shade, _ = shades(test.images, edges)
    texts = [caption(int(y), int(s), rng, a.uninformative) for y, s in zip(train.labels, train_shade)]
    pairs = PairRecords(texts, images=train.images, name="fashion-captions")
    result: dict = {"date": time.strftime("%Y-%m-%d"), "pairs": n, "epochs": epochs, "seeds": seeds,
                    "uninformative": a.uninformative, "test_images": len(test), "example_captions": texts[:6],
                    "chance_top1": 10.0, "per_seed": {}}
    for seed in seeds:
        result["per_seed"][seed] = one_seed(seed, a, out, pairs, train, test, test_shade, size, epochs, n,
                                            probe_epochs)
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    runs = [_leaves(r) for r in result["per_seed"].values()]
    result["mean"] = {k: round(statistics.mean(r[k] for r in runs), 2) for k in runs[0]}
    if len(runs) > 1:
        result["std"] = {k: round(statistics.stdev(r[k] for r in runs), 2) for k in runs[0]}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if not a.quick:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("mean", "std") if k in result}, indent=2))


if __name__ == "__main__":
    main()
