"""kNN accuracy of a pretrained ViT's features after each block: where in the network a method
leaves its best features (MAE's get better with depth, SimMIM's worse; BENCHMARKS.md).

The feature after block i is the mean of the patch tokens, without the final norm; the kNN bank
and test images are those of ``ssl_methods.py``'s preset (Fashion-MNIST, cosine, t = 0.1).

    python benchmarks/ssl_methods.py --preset cpu --methods simmim@vit --no-lightly --out runs/simmim40 train.epochs=40
    python benchmarks/knn_by_block.py runs/simmim40/keel-simmim-vit
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ssl_methods import PRESETS, eval_splits  # noqa: E402

from keel.engine.checkpoint import load_backbone, read_card  # noqa: E402
from keel.evaluate.frozen import make_eval_transform  # noqa: E402
from keel.evaluate.knn import knn_eval  # noqa: E402
from keel.models.vit import VisionTransformer  # noqa: E402


@torch.no_grad()
def block_features(vit: VisionTransformer, images: torch.Tensor, transform, batch: int = 500) -> list[torch.Tensor]:
    """One (N, D) tensor per block: the mean of the patch tokens after that block (caught by
    forward hooks while the ViT runs its own forward)."""
    out: list[list[torch.Tensor]] = [[] for _ in vit.blocks]
    hooks = [blk.register_forward_hook(lambda _m, _i, t, k=k: out[k].append(t[:, vit.num_prefix_tokens:].mean(1)))
             for k, blk in enumerate(vit.blocks)]
    try:
        for i in range(0, len(images), batch):
            vit.forward_tokens(transform(images[i:i + batch]))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(f) for f in out]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run directory (or backbone file) holding a ViT")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="which kNN bank / test images")
    ap.add_argument("--k", type=int, default=200)
    args = ap.parse_args()
    vit = load_backbone(args.run).eval()
    if not isinstance(vit, VisionTransformer):
        sys.exit(f"error: {args.run} holds a {type(vit).__name__}, not a ViT")
    size = read_card(args.run)[1]["model_kwargs"]["img_size"]
    train, test = eval_splits(args.preset, size)
    transform = make_eval_transform(size)
    a, b = block_features(vit, train.images, transform), block_features(vit, test.images, transform)
    print(f"kNN@{args.k} top-1 after each block ({args.run}):")
    for k, (ftr, fte) in enumerate(zip(a, b), 1):
        r = knn_eval(ftr, train.labels, fte, test.labels, ks=(args.k,), temperature=0.1)
        print(f"  block {k}: {r[f'knn_top1@{args.k}']:.2f}", flush=True)


if __name__ == "__main__":
    main()
