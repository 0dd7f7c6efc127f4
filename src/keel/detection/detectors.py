"""torchvision's detectors around any keel backbone: Faster R-CNN, Mask R-CNN and RetinaNet over a
feature pyramid (:mod:`keel.detection.pyramid`), with ViTDet's head changes as options.

The detectors are torchvision's own classes; keel only chooses their parts:

* anchors: one size per pyramid level, 8 x the level's stride (32 px at stride 4 ... 512 at 64,
  Detectron2's and torchvision's FPN default), aspect ratios 0.5 / 1 / 2; RetinaNet adds the
  2^(1/3) and 2^(2/3) octave scales of its paper. ``anchor_scale`` multiplies them all (small
  objects in small images: aerial tree crowns are 10-40 px).
* ``vitdet_heads`` (Li et al. 2022, ViTDet's Mask R-CNN): an RPN with 2 convs instead of 1, the box
  head as 4 convs + 1 fc ("4conv1fc") with a LayerNorm over the channels after each conv, and the
  mask head's convs normalised the same way; RetinaNet's head gets the same norm (torchvision's
  default is GroupNorm). Without it: torchvision's FPN heads (1-conv RPN, two fc layers).
* images: torchvision's ``GeneralizedRCNNTransform`` normalises with the backbone's mean/std,
  resizes the longer side to ``img_size`` (``min_size = max_size = img_size``: a square training
  crop is left as it is) and pads each batch to a multiple of the pyramid's ``size_divisible``
  (the least common multiple of its strides, p6's included: the anchor generator reads each
  level's stride as image size // map size, which is exact only then).

``num_classes`` counts the object classes; torchvision's label 0 is the background, so the
detectors are built with ``num_classes + 1`` outputs and labels run 1..num_classes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from keel.detection.pyramid import LayerNorm2d

KINDS = ("faster_rcnn", "mask_rcnn", "retinanet")


def anchor_generator(strides: Sequence[int], scale: float = 1.0, octaves: bool = False) -> AnchorGenerator:
    """One anchor size per level (8 x stride x ``scale``), ratios 0.5/1/2; ``octaves``: RetinaNet's
    three sizes per level (x 1, 2^(1/3), 2^(2/3))."""
    mults = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)) if octaves else (1.0,)
    sizes = tuple(tuple(8 * s * scale * m for m in mults) for s in strides)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))


def build_detector(kind: str, pyramid: nn.Module, num_classes: int, img_size: int,
                   mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                   vitdet_heads: bool = True, anchor_scale: float = 1.0, detections_per_img: int = 100,
                   score_thresh: float = 0.05, roi_batch: int = 512) -> nn.Module:
    """A torchvision detector of ``kind`` (:data:`KINDS`) on ``pyramid`` (an nn.Module returning an
    OrderedDict of maps "0".."3" and "pool", with ``out_channels``, ``strides`` and
    ``size_divisible``) for ``num_classes`` object classes. The heads are as wide as the pyramid:
    convs of ``out_channels``, fc layers of 4 x that (ViTDet's 256 and 1024). ``roi_batch``: RoIs
    sampled per image for the box head's loss (torchvision's and Detectron2's 512)."""
    if kind not in KINDS:
        raise ValueError(f"model.detector must be one of {' | '.join(KINDS)}, got {kind!r}")
    if num_classes < 1:
        raise ValueError("a detector needs at least one object class")
    C, strides = pyramid.out_channels, list(pyramid.strides)
    common = dict(min_size=img_size, max_size=img_size, image_mean=list(mean), image_std=list(std),
                  size_divisible=getattr(pyramid, "size_divisible", 32))
    if kind == "retinanet":
        anchors = anchor_generator(strides, anchor_scale, octaves=True)
        norm = LayerNorm2d if vitdet_heads else None
        head = RetinaNetHead(C, anchors.num_anchors_per_location()[0], num_classes + 1,
                             **({"norm_layer": norm} if norm else {}))
        return RetinaNet(pyramid, num_classes + 1, anchor_generator=anchors, head=head,
                         score_thresh=score_thresh, detections_per_img=detections_per_img, **common)

    anchors = anchor_generator(strides, anchor_scale)
    rpn_head = RPNHead(C, anchors.num_anchors_per_location()[0], conv_depth=2 if vitdet_heads else 1)
    maps = [str(i) for i in range(len(strides) - 1)]   # RoIs pool from p2..p5, not the extra p6
    box_pool = MultiScaleRoIAlign(maps, output_size=7, sampling_ratio=2)
    if vitdet_heads:
        box_head = FastRCNNConvFCHead((C, 7, 7), [C] * 4, [4 * C], norm_layer=LayerNorm2d)
    else:
        box_head = TwoMLPHead(C * 7 * 7, 4 * C)
    parts = dict(rpn_anchor_generator=anchors, rpn_head=rpn_head, box_roi_pool=box_pool, box_head=box_head,
                 box_predictor=FastRCNNPredictor(4 * C, num_classes + 1), box_score_thresh=score_thresh,
                 box_detections_per_img=detections_per_img, box_batch_size_per_image=roi_batch, **common)
    if kind == "faster_rcnn":
        return FasterRCNN(pyramid, **parts)
    mask_head = MaskRCNNHeads(C, [C] * 4, 1, norm_layer=LayerNorm2d if vitdet_heads else None)
    return MaskRCNN(pyramid, mask_roi_pool=MultiScaleRoIAlign(maps, output_size=14, sampling_ratio=2),
                    mask_head=mask_head, mask_predictor=MaskRCNNPredictor(C, C, num_classes + 1), **parts)
