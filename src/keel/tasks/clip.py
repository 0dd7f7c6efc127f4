"""Image-text contrastive pretraining (CLIP, SigLIP; LiT with a locked image tower) as a
:class:`~keel.tasks.base.Task` on the shared trainer.

The image tower is any keel backbone (its ``forward`` gives the pooled (B, D) feature) followed by
a linear projection without bias to the joint embedding; the text tower is
:class:`keel.models.text.TextTransformer`. A batch's ``labels`` are the captions' tokens (see
:mod:`keel.data.pairs`); the image views are light random resized crops normalised as every keel
backbone expects (mean = std = 0.5). After each optimizer step the temperature is clamped
(CLIP: at most 100).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from keel.data.views import BatchAugment, ViewConfig, eval_transform
from keel.models.text import TextTransformer
from keel.tasks.base import StepRNG, Task
from keel.tasks.clip_losses import build_loss

MEAN = STD = (0.5, 0.5, 0.5)


class ClipTask(Task):
    name = "clip"

    def __init__(self, backbone: nn.Module, text: TextTransformer, embed_dim: int, img_size: int,
                 loss: str = "clip", local_loss: bool = False, lock_image: bool = False,
                 crop_scale: tuple[float, float] = (0.9, 1.0)):
        super().__init__()
        self.backbone, self.text = backbone, text
        self.image_proj = nn.Linear(backbone.num_features, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=backbone.num_features ** -0.5)
        if text.cfg.embed_dim != embed_dim:
            raise ValueError(f"the text tower projects to {text.cfg.embed_dim}, the joint embedding is {embed_dim}")
        self.loss = build_loss(loss, local_loss)
        self.name = loss
        self.img_size, self.lock_image = int(img_size), bool(lock_image)
        if lock_image:
            for p in backbone.parameters():
                p.requires_grad_(False)
        self.augment = BatchAugment(ViewConfig(size=self.img_size, scale=crop_scale, hflip=0.0, jitter_p=0.0,
                                               gray_p=0.0, blur_p=0.0, mean=MEAN, std=STD))

    def make_batch(self, batch: dict, rng: StepRNG) -> dict:
        return {"images": self.augment(batch["images"], rng.own, batch.get("sizes")), "tokens": batch["labels"]}

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised joint embeddings of normalised float images."""
        if self.lock_image:
            with torch.no_grad():
                feats = self.backbone(x)
        else:
            feats = self.backbone(x)
        return F.normalize(self.image_proj(feats), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def training_step(self, batch: dict) -> dict:
        return self.loss(self.encode_image(batch["images"]), self.encode_text(batch["tokens"]))

    def train_mode(self) -> None:
        self.train()
        if self.lock_image:   # LiT: BatchNorm statistics and dropout of the locked tower stay as given
            self.backbone.eval()

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.loss.clamp_()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on the task's device -> normalised embeddings (evaluation transform)."""
        return self.encode_image(eval_transform(images, self.img_size, MEAN, STD))
