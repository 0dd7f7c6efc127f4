"""``keel detect``'s typed config, sectioned like the others (keel.config): data, model, aug, train
(the shared :class:`~keel.config.TrainConfig`), eval.

Defaults follow ViTDet's recipe (Li et al. 2022, Mask R-CNN on COCO) where it carries over to small
data: AdamW with weight decay 0.1, layer-wise lr decay 0.7, drop-path 0.1, a step schedule that
divides the lr by 10 at 88.9% and 96.3% of the run, large-scale jitter 0.1-2.0, a flip. What does
not carry over is sized for a first run on a team's own few hundred images: the image side (ViTDet:
1024) is the data's own (see :func:`keel.jobs.detect.resolve_img_size`), the batch is 8 (ViTDet:
64) and the lr is 1e-2 per 256 images, 3e-4 a step at batch 8 (ViTDet's 1e-4 at batch 64 is 4e-4
per 256, 1.25e-5 a step at batch 8, which leaves a short run near where it started: on generated
shapes from random init, 140 steps of 8 reach AP50 33 at 1e-2 per 256 and 37 at 4e-2; 280 steps at
4e-2 without layer decay reach 99.7).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from keel.config import TrainConfig


@dataclass
class DetectDataConfig:
    source: str = ""                # annotations: COCO JSON, a folder of Pascal VOC XML, or a CSV
                                    # image_path,xmin,ymin,xmax,ymax,label (deepforest's layout)
    images: str = ""                # folder the annotations' image paths are relative to ("" = the
                                    # annotation file's folder)
    test_source: str = ""           # annotations of the test images; "" = hold out test_fraction
    test_fraction: float = 0.2      # of the images (whole images, every 5th by default), when no test_source
    tile: int = 0                   # > 0: cut images larger than this into tiles of this side (aerial)
    tile_overlap: int = 64          # pixels two neighbouring tiles share
    on_bad: str = "error"           # error | skip: a bad row (box outside the image, zero area,
                                    # unknown image) stops the run or is skipped and counted
    num_workers: int = 2


@dataclass
class DetectModelConfig:
    backbone: str = ""              # a keel run directory, .safetensors, timm:<model>:<file> or random:<model>
    detector: str = "faster_rcnn"   # faster_rcnn | mask_rcnn | retinanet (torchvision's)
    vitdet_heads: bool = True       # 2-conv RPN, 4conv1fc box head and mask head with LayerNorm
    window_size: int = 0            # plain ViTs: window attention in all but 4 global blocks; 0 =
                                    # 14 at 1024 px scaled to the image (a quarter of the patch grid)
    rel_pos_decomposed: bool = False    # plain ViTs: ViTDet's decomposed relative positions in every
                                        # block (tables start at zero; a (heads, N, N) term per block)
    out_channels: int = 256         # pyramid channels
    freeze_backbone: bool = False   # True: only the pyramid and heads train
    freeze_bn: bool = True          # BatchNorm statistics of the backbone stay as pretrained
    drop_path_rate: float = 0.1
    anchor_scale: float = 1.0       # multiply every anchor size (8 x each level's stride)
    roi_batch: int = 128            # RoIs sampled per image for the box loss (torchvision: 512; a few
                                    # hundred objects per image at most here, and 4x less head work)


@dataclass
class DetectAugConfig:
    img_size: int = 0               # training square and evaluation longer side; 0 = the training
                                    # images' (or tiles') median longer side, a multiple of 32, <= 1024
    scale_min: float = 0.1          # large-scale jitter range (ViTDet: 0.1-2.0)
    scale_max: float = 2.0
    hflip: float = 0.5              # aerial and most photos: a mirror image has the same objects


@dataclass
class DetectEvalConfig:
    score_thresh: float = 0.05      # detections kept for AP (COCO wants low-score ones too)
    detections_per_img: int = 100   # COCO's maximum
    draw_thresh: float = 0.5        # predict: boxes drawn on the PNGs at this score or above


def _detect_train() -> TrainConfig:
    return TrainConfig(epochs=50, batch_size=8, lr=1e-2, weight_decay=0.1, layer_decay=0.7,
                       schedule="step", milestones=[0.889, 0.963], warmup_epochs=1.0,
                       drop_last=False, log_every=10, eval_every=5)


@dataclass
class DetectConfig:
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    aug: DetectAugConfig = field(default_factory=DetectAugConfig)
    train: TrainConfig = field(default_factory=_detect_train)
    eval: DetectEvalConfig = field(default_factory=DetectEvalConfig)
