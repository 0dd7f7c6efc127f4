"""TIDE error breakdown: a fixture with every error kind (counts and dAPs computed by hand), and
agreement with tidecv itself on it and on random fixtures.

Tolerance: the rules and the 101 recall thresholds (i / 100) are tidecv's, and the fixtures' scores
are distinct (so no tie order matters), so both sides compute the same numbers; only the order
of float summation differs (Python ``sum`` there, numpy here), worth ~1e-13 AP points. 1e-9
leaves room for that and nothing else.
"""
from __future__ import annotations

import contextlib
import io
import json
import random

import pytest

from keel.detection.errors import ERROR_TYPES, error_breakdown
from keel.detection.plots import plot_error_breakdown

tidecv = pytest.importorskip("tidecv")

TOL = 1e-9
TIDE_NAMES = {"cls": "Cls", "loc": "Loc", "both": "Both", "dupe": "Dupe", "bkg": "Bkg", "miss": "Miss"}
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
CAT, DOG, BIRD = 1, 2, 3


def _ann(image_id, category_id, box, iscrowd=0):
    x, y, w, h = box
    # tidecv's COCO loader turns every gt's segmentation into RLE, even for box evaluation.
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "area": w * h,
            "iscrowd": iscrowd, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def _det(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score}


def _gt(anns, n_images):
    images = [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in range(1, n_images + 1)]
    return {"images": images, "categories": CATEGORIES,
            "annotations": [dict(a, id=k + 1) for k, a in enumerate(anns)]}


# Boxes are 40x40 unless said; IoU of two 40x40 boxes shifted by (dx, dy): (40-dx)(40-dy) / (3200 - that).
EVERY_ERROR_GT = _gt([
    _ann(1, CAT, (0, 0, 40, 40)),        # A: found by d1
    _ann(1, DOG, (100, 100, 40, 40)),    # B: only a cat (d3) and a shifted dog (d4) on it
    _ann(2, CAT, (50, 50, 40, 40)),      # C: only a shifted cat (d5)
    _ann(2, BIRD, (0, 150, 40, 40)),     # D: nothing near it -> missed
    _ann(4, BIRD, (0, 0, 50, 50)),       # E: found by d9
    _ann(5, CAT, (0, 0, 60, 60)),        # F: found by d10
    _ann(5, DOG, (100, 100, 50, 50)),    # G: found by d11
], n_images=5)
EVERY_ERROR_DETS = [
    _det(1, CAT, (0, 0, 40, 40), 0.95),     # d1  TP (A)
    _det(1, CAT, (2, 2, 40, 40), 0.90),     # d2  dupe: IoU 0.90 with A, which d1 took
    _det(1, CAT, (100, 100, 40, 40), 0.85),  # d3  cls: IoU 1 with the dog B
    _det(1, DOG, (100, 120, 40, 40), 0.60),  # d4  loc: IoU 1/3 with B; B's best fix is d3
    _det(2, CAT, (60, 60, 40, 40), 0.80),   # d5  loc: IoU 900/2300 with C
    _det(2, DOG, (150, 0, 30, 30), 0.75),   # d6  bkg: touches nothing
    _det(2, DOG, (50, 70, 40, 40), 0.70),   # d7  both: IoU 1/3 with the cat C
    _det(3, BIRD, (10, 10, 20, 20), 0.65),  # d8  bkg: image 3 has no gt
    _det(4, BIRD, (0, 0, 50, 50), 0.55),    # d9  TP (E)
    _det(5, CAT, (0, 0, 60, 60), 0.50),     # d10 TP (F)
    _det(5, DOG, (100, 100, 50, 50), 0.45),  # d11 TP (G)
]
EVERY_ERROR_COUNTS = {"cls": 1, "loc": 2, "both": 1, "dupe": 1, "bkg": 2, "miss": 1}
# Per class, in units of 1/101 (the sum of the envelope at the 101 recall thresholds):
#   cat  (3 gt) TP FP FP FP TP: envelope 1 for recall <= 1/3 (34 thresholds), 0.4 to 2/3 (33) -> 47.2
#   dog  (2 gt) FP FP FP TP:    0.25 up to recall 1/2 (51)                                    -> 12.75
#   bird (2 gt) FP TP:          0.5 up to recall 1/2 (51)                                     -> 25.5
# Fixing, say, dupe removes d2: cat's envelope becomes 1 (34), then 0.5 (33) -> 50.5, dAP 3.3.
# Each dAP is the change of the three-class sum, / 303 * 100.
BASE = (47.2 + 12.75 + 25.5) / 303 * 100
EVERY_ERROR_DAP = {
    "cls": (3.3 + 58.25) / 303 * 100,   # d3 becomes dog's first TP: dog 1 (51) then 0.4 (50) -> 71
    "loc": (27.0 + 4.25) / 303 * 100,   # d5 a cat TP (74.2); d4 suppressed, dog 1/3 (51) -> 17
    "both": 4.25 / 303 * 100,           # d7 gone: dog 17
    "dupe": 3.3 / 303 * 100,
    "bkg": (4.25 + 25.5) / 303 * 100,   # d6, d8 gone: dog 17, bird 1 (51) -> 51
    "miss": 25.0 / 303 * 100,           # D uncounted: bird FP TP at recall 1 -> 50.5
}
EVERY_ERROR_SPECIAL = {
    "false_positive": (67 + 51 + 51 - 85.45) / 303 * 100,  # TPs first: recall 2/3, 1/2, 1/2
    "false_negative": (71 + 25.25 + 50.5 - 85.45) / 303 * 100,  # C, B, D uncounted
}


def _tide(gt, dets, tmp_path):
    """tidecv's AP50, main and special dAPs and error counts on the same gt and detections."""
    from tidecv import TIDE, datasets

    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    tide = TIDE()
    with contextlib.redirect_stdout(io.StringIO()):
        run = tide.evaluate(datasets.COCO(str(tmp_path / "gt.json")), datasets.COCOResult(str(tmp_path / "dets.json")),
                            mode=TIDE.BOX, name="run")
        main, special = tide.get_main_errors()["run"], tide.get_special_errors()["run"]
    return {"AP50": run.ap,
            "dAP": {k: main[v] for k, v in TIDE_NAMES.items()},
            "counts": {k: len(run.error_dict[e]) for e in TIDE._error_types
                       for k, v in TIDE_NAMES.items() if e.short_name == v},
            "special_dAP": {"false_positive": special["FalsePos"], "false_negative": special["FalseNeg"]}}


def _assert_same(ours, ref):
    assert ours["counts"] == ref["counts"]
    assert ours["AP50"] == pytest.approx(ref["AP50"], abs=TOL)
    for k in ERROR_TYPES:
        assert ours["dAP"][k] == pytest.approx(ref["dAP"][k], abs=TOL), k
    for k in ("false_positive", "false_negative"):
        assert ours["special_dAP"][k] == pytest.approx(ref["special_dAP"][k], abs=TOL), k


def test_every_error_kind_by_hand():
    r = error_breakdown(EVERY_ERROR_GT, EVERY_ERROR_DETS)
    assert r["counts"] == EVERY_ERROR_COUNTS
    assert r["AP50"] == pytest.approx(BASE, abs=TOL)
    assert r["dAP"] == pytest.approx(EVERY_ERROR_DAP, abs=TOL)
    assert r["special_dAP"] == pytest.approx(EVERY_ERROR_SPECIAL, abs=TOL)


def test_every_error_kind_equals_tidecv(tmp_path):
    ref = _tide(EVERY_ERROR_GT, EVERY_ERROR_DETS, tmp_path)
    _assert_same(error_breakdown(EVERY_ERROR_GT, EVERY_ERROR_DETS), ref)
    assert all(v > 0 for v in ref["dAP"].values())  # the fixture moves every kind


def test_thresholds_at_their_boundaries(tmp_path):
    # IoU exactly 0.5 with a gt already taken is Loc, not Dupe (Loc's range is closed); exactly 0.1
    # with a gt of its class is Loc, with one of another class only is Bkg, not Both.
    gt = _gt([_ann(1, CAT, (0, 0, 40, 40))], n_images=1)
    dets = [_det(1, CAT, (0, 0, 40, 40), 0.9), _det(1, CAT, (0, 0, 40, 80), 0.8),
            _det(1, CAT, (0, 0, 40, 400), 0.7), _det(1, DOG, (0, 0, 40, 400), 0.6)]
    r = error_breakdown(gt, dets)
    assert r["counts"] == {"cls": 0, "loc": 2, "both": 0, "dupe": 0, "bkg": 1, "miss": 0}
    _assert_same(r, _tide(gt, dets, tmp_path))


def _random_fixture(seed: int, n_images: int = 10, crowded_image: bool = False):
    rng = random.Random(seed)
    anns, dets = [], []
    for i in range(1, n_images + 1):
        for _ in range(rng.randint(0, 5)):
            box = (rng.uniform(0, 140), rng.uniform(0, 140), rng.uniform(10, 60), rng.uniform(10, 60))
            c = rng.randint(1, 2)  # no bird gt: bird detections are a class without ground truth
            anns.append(_ann(i, c, box))
            for _ in range(rng.randint(0, 3)):
                x, y, w, h = (v + rng.gauss(0, 4) for v in box)
                dets.append(_det(i, c if rng.random() < 0.7 else rng.randint(1, 3), (x, y, max(w, 1), max(h, 1)), rng.random()))
        for _ in range(rng.randint(0, 2) + (110 if crowded_image and i == 1 else 0)):
            box = (rng.uniform(0, 150), rng.uniform(0, 150), rng.uniform(5, 50), rng.uniform(5, 50))
            dets.append(_det(i, rng.randint(1, 3), box, rng.random()))
    return _gt(anns, n_images), dets


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_fixtures_equal_tidecv(seed, tmp_path):
    # seed 3 puts 110+ detections on one image: both sides keep its 100 best (over all classes).
    gt, dets = _random_fixture(seed, crowded_image=seed == 3)
    _assert_same(error_breakdown(gt, dets), _tide(gt, dets, tmp_path))


def test_crowd_regions_and_empty_input():
    gt = _gt([_ann(1, CAT, (0, 0, 40, 40)), _ann(1, CAT, (100, 100, 80, 80), iscrowd=1)], n_images=1)
    dets = [_det(1, CAT, (0, 0, 40, 40), 0.9)]
    plain = error_breakdown(gt, dets)
    # A cat inside the crowd region of cats is neither a positive nor an error.
    covered = error_breakdown(gt, dets + [_det(1, CAT, (110, 110, 20, 20), 0.95)])
    assert covered == plain and plain["AP50"] == pytest.approx(100)
    # ... a dog there is a background error (crowds are not objects to match).
    assert error_breakdown(gt, dets + [_det(1, DOG, (110, 110, 20, 20), 0.95)])["counts"]["bkg"] == 1
    nothing = error_breakdown(gt, [])
    assert nothing["AP50"] == 0 and nothing["counts"]["miss"] == 1
    assert nothing["dAP"]["miss"] == 0  # the one cat uncounted leaves no class to average


def test_error_breakdown_picture(tmp_path):
    path = plot_error_breakdown(error_breakdown(EVERY_ERROR_GT, EVERY_ERROR_DETS), tmp_path / "tide.png", "")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
