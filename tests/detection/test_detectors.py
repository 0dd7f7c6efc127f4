"""torchvision's detectors around keel pyramids: the parts keel chooses (anchors by formula,
ViTDet's heads), a train step for each kind, boxes back in the input image's pixels, and the
large-scale-jitter views moving boxes with the pixels."""
from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead

import keel
from keel.detection.augment import as_target, lsj, plain
from keel.detection.detectors import anchor_generator, build_detector
from keel.detection.pyramid import LayerNorm2d, build_pyramid


def small_pyramid(name="resnet18", channels=16):
    torch.manual_seed(0)
    return build_pyramid(keel.create_model(name), channels)


def targets(n=2, size=64):
    return [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 28.0], [30.0, 20.0, 60.0, 50.0]]),
             "labels": torch.tensor([1, 2]), "masks": torch.zeros(2, size, size, dtype=torch.uint8)} for _ in range(n)]


def test_anchor_sizes_are_eight_strides_and_octaves():
    g = anchor_generator([4, 8, 16, 32, 64])
    assert [s[0] for s in g.sizes] == [32, 64, 128, 256, 512] and g.aspect_ratios[0] == (0.5, 1.0, 2.0)
    r = anchor_generator([8, 16], scale=0.5, octaves=True)
    assert r.sizes[0] == pytest.approx((32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)))
    assert r.num_anchors_per_location() == [9, 9]


def test_vitdet_heads_are_4conv1fc_with_layernorm_and_a_2conv_rpn():
    det = build_detector("faster_rcnn", small_pyramid(channels=16), 3, 64, vitdet_heads=True)
    head = det.roi_heads.box_head
    assert isinstance(head, FastRCNNConvFCHead)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.modules()) == 4
    assert sum(isinstance(m, LayerNorm2d) for m in head.modules()) == 4
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == 1
    assert sum(isinstance(m, torch.nn.Conv2d) for m in det.rpn.head.conv.modules()) == 2
    assert det.roi_heads.box_predictor.cls_score.out_features == 4          # 3 classes + background
    plain_det = build_detector("faster_rcnn", small_pyramid(channels=16), 3, 64, vitdet_heads=False)
    assert isinstance(plain_det.roi_heads.box_head, TwoMLPHead)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in plain_det.rpn.head.conv.modules()) == 1


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn", "retinanet"])
def test_each_kind_trains_and_returns_boxes_in_the_input_pixels(kind):
    det = build_detector(kind, small_pyramid(), 2, 64, score_thresh=0.0)
    det.train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    losses = det(images, targets())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert det.backbone.backbone.stem[0].weight.grad.abs().sum() > 0      # the backbone learns too
    det.eval()
    with torch.no_grad():
        out = det([torch.rand(3, 40, 100)])[0]       # resized to 64 on the longer side inside, mapped back
    assert len(out["boxes"]) > 0
    assert out["boxes"][:, 2].max() <= 100 + 1e-3 and out["boxes"][:, 3].max() <= 40 + 1e-3
    assert out["boxes"][:, 2].max() > 64           # not left in the resized frame
    if kind == "mask_rcnn":
        assert out["masks"].shape[-2:] == (40, 100)


def test_unknown_kind_is_one_line():
    with pytest.raises(ValueError, match="model.detector must be one of"):
        build_detector("yolo", small_pyramid(), 2, 64)


def _white_box_image(size=64, box=(10, 20, 30, 50)):
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    img[:, y0:y1, x0:x1] = 255
    t = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1])}
    return img, t


def test_lsj_flip_at_scale_one_is_the_mirror_formula():
    img, t = _white_box_image()
    out_img, out_t = plain(*lsj(64, (1.0, 1.0), hflip=1.0)(img, as_target(t, (64, 64))))
    assert out_img.shape == (3, 64, 64)
    assert out_t["boxes"].tolist() == [[64 - 30, 20, 64 - 10, 50]]            # x -> W - x
    assert torch.equal(out_img, img.flip(-1))


def test_lsj_boxes_follow_the_pixels_at_any_scale():
    torch.manual_seed(0)
    views = lsj(64, (0.3, 2.0), hflip=0.5)
    for _ in range(20):
        img, t = _white_box_image()
        out_img, out_t = plain(*views(img, as_target(t, (64, 64))))
        assert out_img.shape == (3, 64, 64)
        white = (out_img[0] > 200).nonzero()
        if len(out_t["boxes"]) == 0:           # cropped away: so are its pixels (but for a sliver)
            assert len(white) < 4
            continue
        x0, y0, x1, y1 = out_t["boxes"][0].tolist()
        # every white pixel lies in the box (one pixel of resampling slack)
        assert white[:, 1].min() >= x0 - 1 and white[:, 1].max() <= x1 and \
            white[:, 0].min() >= y0 - 1 and white[:, 0].max() <= y1


def test_lsj_masks_move_with_the_boxes():
    img, t = _white_box_image()
    t["masks"] = (img[0:1] > 0).to(torch.uint8).expand(1, 64, 64).clone()
    torch.manual_seed(3)
    out_img, out_t = plain(*lsj(48, (0.5, 1.5))(tv_tensors.Image(img), as_target(t, (64, 64))))
    m, white = out_t["masks"][0].nonzero(), (out_img[0] > 191).nonzero()     # the padding is 128
    # the mask is where the white pixels went: the same extent within a pixel (edges resample)
    assert len(m) > 20
    assert (m.min(0).values - white.min(0).values).abs().max() <= 1
    assert (m.max(0).values - white.max(0).values).abs().max() <= 1
