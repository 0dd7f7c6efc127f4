"""Detection as a task of the one trainer: a torchvision detector around a keel backbone
(:mod:`keel.detection.detectors`) trained on large-scale-jittered views, evaluated by COCO AP.

The task owns the backbone (``self.backbone``, registered first, so layer-wise lr decay numbers its
parameters as in classification: patch embedding 0, block i i + 1, pyramid and heads on top) and
the detector that uses it. Batches come as ``{"images": [uint8 (3, H, W), ...], "targets": [{boxes,
labels, (masks)}, ...]}`` (:class:`keel.detection.loader.DetectionData`); ``make_batch`` jitters
each image to the fixed training square, and the detector returns its losses (RPN objectness and
box, RoI classification and box, masks), summed into the loss and logged one by one.

``freeze_backbone``: only the pyramid and heads train (the backbone in eval mode). ``freeze_bn``
(default): BatchNorm layers of the backbone keep their statistics, as torchvision's and
Detectron2's detection backbones do (FrozenBatchNorm): batches of a few images give poor statistics.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from keel.detection.augment import as_target, lsj, plain
from keel.tasks.base import StepRNG, Task


class DetectionTask(Task):
    name = "detect"
    main_metric = "AP"

    def __init__(self, backbone: nn.Module, detector: nn.Module, img_size: int, classes: list[str],
                 scale: tuple[float, float] = (0.1, 2.0), hflip: float = 0.5, freeze_backbone: bool = False,
                 freeze_bn: bool = True, eval_batch: int = 4):
        super().__init__()
        self.backbone = backbone
        self.detector = detector
        self.classes = list(classes)
        self.img_size = img_size
        self.views = lsj(img_size, scale, hflip)
        self.freeze_backbone, self.freeze_bn, self.eval_batch = freeze_backbone, freeze_bn, eval_batch
        if freeze_backbone:
            backbone.requires_grad_(False)

    def train_mode(self) -> None:
        self.train()
        if self.freeze_backbone:
            self.backbone.eval()
        elif self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def make_batch(self, batch: dict, rng: StepRNG) -> dict:
        images, targets = [], []
        for image, target in zip(batch["images"], batch["targets"]):
            image, target = self.views(image, as_target(target, tuple(image.shape[-2:])))
            image, target = plain(image, target)
            images.append(image.float() / 255)
            targets.append(target)
        return {"images": images, "targets": targets}

    def training_step(self, batch: dict) -> dict:
        losses = self.detector(batch["images"], batch["targets"])
        return {"loss": sum(losses.values()), **{k: v.detach() for k, v in losses.items()}}

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], model: nn.Module | None = None) -> list[dict]:
        """Detections ({boxes xyxy, scores, labels, (masks)}) in each uint8 image's own pixels."""
        detector = (model or self).detector
        was = detector.training
        detector.eval()
        device = next(detector.parameters()).device
        out = []
        for i in range(0, len(images), self.eval_batch):
            chunk = [im.to(device).float() / 255 for im in images[i:i + self.eval_batch]]
            out += [{k: v.cpu() for k, v in d.items()} for d in detector(chunk)]
        detector.train(was)
        return out

    def detections(self, data, model: nn.Module | None = None) -> tuple[list[dict], int]:
        """COCO result entries for every image of ``data`` (a
        :class:`keel.detection.loader.DetectionData`) and the number of images that could not be
        decoded (left out: their ground truth counts as missed)."""
        from keel.data.errors import BadImageError
        from keel.detection.coco_eval import predictions_to_coco
        results, bad = [], 0
        for start in range(0, len(data), self.eval_batch):
            items = []
            for i in range(start, min(len(data), start + self.eval_batch)):
                try:
                    items.append(data.item(i))
                except BadImageError:
                    bad += 1
            if items:
                preds = self.predict([im for im, _ in items], model)
                results += predictions_to_coco(preds, [t["image_id"] for _, t in items])
        return results, bad

    def evaluate(self, data, trainer=None, model: nn.Module | None = None) -> dict:
        """COCO box AP, AP50 and AP75 (0-100) on ``data``."""
        from keel.detection.coco_eval import evaluate_coco
        results, _ = self.detections(data, model)
        res = evaluate_coco(data.coco(), results, iou_type="bbox")
        return {k: res[k] for k in ("AP", "AP50", "AP75")}

    def export_backbone(self) -> nn.Module:
        return self.backbone
