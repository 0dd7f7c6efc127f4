"""COCO metrics: hand-computed APs (COCO's 101-point interpolation), pycocotools called directly on
a random fixture, torchvision outputs as COCO results, and the pictures drawn from them."""
from __future__ import annotations

import contextlib
import io
import math
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from keel.data.errors import DataError
from keel.detection.coco_eval import evaluate_coco, predictions_to_coco
from keel.detection.plots import draw_boxes, plot_pr_curves

RECALLS = np.arange(101) / 100


def _gt(anns, images=(1,), categories=((1, "cat"), (2, "dog")), size=64):
    return {"images": [{"id": i, "width": size, "height": size} for i in images],
            "categories": [{"id": c, "name": n} for c, n in categories],
            "annotations": [{"image_id": i, "category_id": c, "bbox": list(b)} for i, c, b in anns]}


def _det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


# One image, two 10x10 cats. Detections by score: a hit on gt A (IoU 1), a miss, an 8x8 box
# inside gt B (IoU 64/100 = 0.64: a hit at IoU 0.5-0.6, a miss from 0.65 up).
TWO_GT = _gt([(1, 1, (0, 0, 10, 10)), (1, 1, (20, 20, 10, 10))], categories=((1, "cat"),))
THREE_DETS = [_det(1, 1, (0, 0, 10, 10), 0.9), _det(1, 1, (40, 40, 5, 5), 0.8), _det(1, 1, (20, 20, 8, 8), 0.7)]
# IoU <= 0.6: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; the envelope is 1 up to recall 0.5
# (51 of COCO's recall thresholds) and 2/3 above it (50 thresholds).
AP_HIT = (51 * 1 + 50 * 2 / 3) / 101
AP_MISS = 51 / 101  # IoU >= 0.65: recall stops at 1/2 with precision 1


def test_hand_computed_precision_recall():
    r = evaluate_coco(TWO_GT, THREE_DETS)
    assert r["AP50"] == pytest.approx(100 * AP_HIT)
    assert r["AP75"] == pytest.approx(100 * AP_MISS)
    assert r["AP"] == pytest.approx(100 * (3 * AP_HIT + 7 * AP_MISS) / 10)  # thresholds .5,.55,.6 hit
    assert r["APs"] == pytest.approx(r["AP"])  # 10x10 boxes are all "small" (< 32^2)
    assert math.isnan(r["APm"]) and math.isnan(r["APl"])
    assert r["per_class"] == {"cat": pytest.approx(r["AP"])}
    curve = r["pr_curves"]["cat"]
    np.testing.assert_allclose(curve["recall"], RECALLS)
    np.testing.assert_allclose(curve["precision@0.5"], [1.0] * 51 + [2 / 3] * 50)
    np.testing.assert_allclose(curve["precision@0.75"], [1.0] * 51 + [0.0] * 50)


def test_perfect_detections_and_per_class_ap():
    gt = _gt([(1, 1, (0, 0, 20, 20)), (1, 2, (30, 30, 20, 20)), (2, 2, (5, 5, 40, 40))], images=(1, 2))
    perfect = [_det(a["image_id"], a["category_id"], a["bbox"], 0.5) for a in gt["annotations"]]
    r = evaluate_coco(gt, perfect)
    assert r["AP"] == pytest.approx(100) and r["per_class"] == {"cat": pytest.approx(100), "dog": pytest.approx(100)}
    # A false dog on the cat, scored above both true dogs: dog's precision 0, 1/2, 2/3 at recall
    # 0, 1/2, 1 -> the envelope is 2/3 at every recall threshold.
    r = evaluate_coco(gt, perfect + [_det(1, 2, (0, 0, 20, 20), 0.9)])
    assert r["per_class"]["cat"] == pytest.approx(100)
    assert r["per_class"]["dog"] == pytest.approx(100 * 2 / 3)
    assert r["AP"] == pytest.approx((100 + 100 * 2 / 3) / 2)


def test_empty_detections_and_images_without_gt():
    gt = _gt([(1, 1, (0, 0, 20, 20))], images=(1, 2))
    r = evaluate_coco(gt, [])
    assert r["AP"] == 0 and r["AP50"] == 0 and r["per_class"]["cat"] == 0
    assert math.isnan(r["per_class"]["dog"])  # no dog in the ground truth
    # A false cat on image 2 (no annotations) outscores the true one: precision 0 then 1/2.
    r = evaluate_coco(gt, [_det(1, 1, (0, 0, 20, 20), 0.5), _det(2, 1, (0, 0, 20, 20), 0.9)])
    assert r["AP"] == pytest.approx(50)
    assert "dog" not in r["pr_curves"]


def _random_fixture(seed: int, n_images: int = 12):
    rng = random.Random(seed)
    anns, dets = [], []
    for i in range(1, n_images + 1):
        for _ in range(rng.randint(0, 6)):
            w, h = rng.uniform(4, 120), rng.uniform(4, 120)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 200 - h)
            c = rng.choice((1, 2, 3))
            anns.append((i, c, (x, y, w, h)))
            for _ in range(rng.randint(0, 2)):
                jit = [rng.gauss(0, 0.1 * s) for s in (w, h, w, h)]
                box = (x + jit[0], y + jit[1], max(1.0, w + jit[2]), max(1.0, h + jit[3]))
                dets.append(_det(i, c if rng.random() < 0.8 else rng.choice((1, 2, 3)), box, rng.random()))
        dets.append(_det(i, rng.choice((1, 2, 3)), (rng.uniform(0, 150), rng.uniform(0, 150), 30, 30), rng.random()))
    return _gt(anns, images=range(1, n_images + 1), categories=((1, "a"), (2, "b"), (3, "c")), size=200), dets


def test_equals_pycocotools_called_directly():
    gt, dets = _random_fixture(0)
    ours = evaluate_coco(gt, dets)
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = {**gt, "annotations": [dict(a, id=k + 1, iscrowd=0, area=a["bbox"][2] * a["bbox"][3])
                                             for k, a in enumerate(gt["annotations"])]}
        api.createIndex()
        ev = COCOeval(api, api.loadRes([dict(d) for d in dets]), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    for k, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert ours[name] == pytest.approx(100 * ev.stats[k]) if ev.stats[k] >= 0 else math.isnan(ours[name])
    # per-class AP averages over the 10 IoUs the same precision array summarize() uses.
    assert np.mean(list(ours["per_class"].values())) == pytest.approx(ours["AP"])
    assert 0 < ours["AP"] < 100


def _square_masks(boxes, size):
    masks = torch.zeros(len(boxes), 1, size, size)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        masks[k, 0, y0:y1, x0:x1] = 0.9
    return masks


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools decode under numpy 2
def test_predictions_to_coco_converts_boxes_labels_and_masks():
    out = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 4.0]]),
           "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([2, 1]),
           "masks": _square_masks([(10, 20, 30, 60), (0, 0, 8, 4)], 64)}
    res = predictions_to_coco([out], [7], category_ids=[11, 22])
    assert [r["bbox"] for r in res] == [[10.0, 20.0, 20.0, 40.0], [0.0, 0.0, 8.0, 4.0]]  # xyxy -> xywh
    assert [r["category_id"] for r in res] == [22, 11] and [r["image_id"] for r in res] == [7, 7]
    assert res[0]["score"] == pytest.approx(0.9)
    decoded = mask_utils.decode(res[0]["segmentation"])
    assert decoded.shape == (64, 64) and decoded.sum() == 20 * 40 and decoded[20:60, 10:30].all()
    assert isinstance(res[0]["segmentation"]["counts"], str)
    assert predictions_to_coco([out], [7])[0]["category_id"] == 2  # no mapping: label = category id
    with pytest.raises(DataError, match="label 2"):
        predictions_to_coco([out], [7], category_ids=[11])


def test_segm_evaluation_of_converted_masks():
    boxes = [(4, 4, 24, 24), (30, 10, 60, 50)]
    gt = _gt([(1, 1, (4, 4, 20, 20)), (1, 2, (30, 10, 30, 40))])
    for ann, (x0, y0, x1, y1) in zip(gt["annotations"], boxes):
        ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        ann["area"] = (x1 - x0) * (y1 - y0)
    out = {"boxes": torch.tensor(boxes, dtype=torch.float), "scores": torch.tensor([0.8, 0.7]),
           "labels": torch.tensor([1, 2]), "masks": _square_masks(boxes, 64)}
    r = evaluate_coco(gt, predictions_to_coco([out], [1]), iou_type="segm")
    assert r["AP50"] == pytest.approx(100)
    # One mask wrongly labelled: the dog class finds nothing, the cat gets a false positive.
    out["labels"] = torch.tensor([1, 1])
    r = evaluate_coco(gt, predictions_to_coco([out], [1]), iou_type="segm")
    assert r["per_class"]["dog"] == 0 and r["per_class"]["cat"] == pytest.approx(100)


def test_bad_input_is_one_clear_error():
    with pytest.raises(DataError, match="detection 0: image_id 9"):
        evaluate_coco(TWO_GT, [_det(9, 1, (0, 0, 1, 1), 0.5)])
    with pytest.raises(DataError, match="detection 1: category_id 5"):
        evaluate_coco(TWO_GT, [THREE_DETS[0], _det(1, 5, (0, 0, 1, 1), 0.5)])
    with pytest.raises(DataError, match="missing 'score'"):
        evaluate_coco(TWO_GT, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(DataError, match="annotation 0 has no 'segmentation'"):
        evaluate_coco(TWO_GT, [], iou_type="segm")
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_coco(TWO_GT, [], iou_type="keypoints")


def _png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pictures_are_written(tmp_path):
    gt, dets = _random_fixture(1)
    assert _png(plot_pr_curves(evaluate_coco(gt, dets)["pr_curves"], tmp_path / "pr.png", "random"))
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    path = draw_boxes(image, torch.tensor([[2.0, 3.0, 30.0, 40.0]]), torch.tensor([1]), torch.tensor([0.87]),
                      ["cat", "dog"], tmp_path / "sub" / "boxes.png", gt_boxes=torch.tensor([[4.0, 4.0, 28.0, 38.0]]))
    assert _png(path)
    from PIL import Image
    assert Image.open(path).size == (640, 480)  # the image's aspect, longer side 640
