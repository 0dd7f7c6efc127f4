"""A classifier on image + text together, beside image-only and text-only ones on the same split.

The towers of an image-text run stay frozen; each pair is embedded once by both, and small heads
train on the embeddings (standardised with the training split's statistics, which each head keeps
as buffers, so a saved head takes raw embeddings):

* ``image`` / ``text``: an MLP on one tower's embedding (the baselines);
* ``concat``: late fusion, an MLP on the two embeddings side by side;
* ``attention``: each embedding projected to a token (plus a modality embedding), a learned class
  token, one Transformer encoder layer over the three, a linear layer on the class token; the
  attention weighs the modalities per example.

:func:`fusion_eval` trains all four and reports test top-1; the same for a
``keel clip train`` run on labeled pairs is :func:`keel.jobs.fusion.fusion_from_run`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

KINDS = ("image", "text", "concat", "attention")
FUSED = ("concat", "attention")      # the heads that see both towers


class FusionHead(nn.Module):
    def __init__(self, kind: str, img_dim: int, txt_dim: int, num_classes: int, hidden: int = 256):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"fusion kind must be one of {' | '.join(KINDS)}, got {kind!r}")
        self.kind, self.hidden = kind, hidden
        for name, dim in (("img", img_dim), ("txt", txt_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        if kind == "attention":
            self.img_token, self.txt_token = nn.Linear(img_dim, hidden), nn.Linear(txt_dim, hidden)
            self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
            self.modality = nn.Parameter(torch.randn(3, hidden) * 0.02)
            self.encoder = nn.TransformerEncoderLayer(hidden, nhead=4, dim_feedforward=2 * hidden, dropout=0.1,
                                                      batch_first=True, norm_first=True)
            self.norm, self.out = nn.LayerNorm(hidden), nn.Linear(hidden, num_classes)
        else:
            dim = {"image": img_dim, "text": txt_dim, "concat": img_dim + txt_dim}[kind]
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, num_classes))

    def standardise_with(self, img: Tensor, txt: Tensor) -> None:
        """Keep the training split's mean and std of each embedding; forward standardises with them."""
        for name, x in (("img", img), ("txt", txt)):
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp(min=1e-6))

    def forward(self, img: Tensor, txt: Tensor) -> Tensor:
        img, txt = (img - self.img_mean) / self.img_std, (txt - self.txt_mean) / self.txt_std
        if self.kind == "image":
            return self.mlp(img)
        if self.kind == "text":
            return self.mlp(txt)
        if self.kind == "concat":
            return self.mlp(torch.cat([img, txt], dim=1))
        tokens = torch.stack([self.img_token(img), self.txt_token(txt)], dim=1)
        x = torch.cat([self.cls.expand(len(img), -1, -1), tokens], dim=1) + self.modality
        return self.out(self.norm(self.encoder(x)[:, 0]))


def train_head(head: FusionHead, img: Tensor, txt: Tensor, y: Tensor, epochs: int = 100, lr: float = 3e-3,
               batch_size: int = 64, weight_decay: float = 1e-4, seed: int = 0) -> FusionHead:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-len(y) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            loss = F.cross_entropy(head(img[idx], txt[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def fusion_eval(train: tuple[Tensor, Tensor, Tensor], test: tuple[Tensor, Tensor, Tensor], num_classes: int,
                kinds=KINDS, epochs: int = 100, hidden: int = 256, seed: int = 0, heads: dict | None = None) -> dict:
    """Test top-1 (percent) of each head, trained on ``train`` = (image emb, text emb, labels);
    ``heads``, when given a dict, receives the trained heads by kind."""
    img_tr, txt_tr, img_te, txt_te = (x.float() for x in (train[0], train[1], test[0], test[1]))
    out = {}
    for kind in kinds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = FusionHead(kind, img_tr.shape[1], txt_tr.shape[1], num_classes, hidden)
            head.standardise_with(img_tr, txt_tr)
            train_head(head, img_tr, txt_tr, train[2], epochs, seed=seed)
        with torch.no_grad():
            out[kind] = 100.0 * float((head(img_te, txt_te).argmax(1) == test[2]).float().mean())
        if heads is not None:
            heads[kind] = head
    out["best_single"] = max(out.get("image", 0.0), out.get("text", 0.0))
    return out


def describe_fusion(res: dict) -> str:
    return (f"test top-1 on {res['test']} pairs ({res['classes']} classes): image-only {res['image']:.1f}, "
            f"text-only {res['text']:.1f}, late fusion {res['concat']:.1f}, attention fusion {res['attention']:.1f}")
