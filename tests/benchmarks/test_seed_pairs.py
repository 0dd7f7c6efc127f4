"""benchmarks/seed_pairs.py: which run supplies each side of a seed, and the paired statistics."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import seed_pairs  # noqa: E402


def write_run(path: Path, seed: int | None, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    overrides = ["train.epochs=20"] + ([f"train.seed={seed}"] if seed is not None else [])
    (path / "ssl_methods.json").write_text(json.dumps({"overrides": overrides, "rows": rows}))
    return path


def row(name: str, knn: float, lin: float) -> dict:
    return {"name": name, "knn200": knn, "linear": lin}


def test_later_run_replaces_a_side_and_the_student_row_is_keels(tmp_path):
    both = write_run(tmp_path / "s0", None, [row("keel dino", 60.0, 70.0), row("keel dino (student)", 62.0, 72.0),
                                            row("lightly dino", 61.0, 71.0)])
    rerun = write_run(tmp_path / "s0-lightly", 0, [row("lightly dino", 63.0, 73.0)])
    found = seed_pairs.collect("dino", [both, rerun])
    assert found[0]["keel"][0]["knn200"] == 62.0 and found[0]["keel"][1] == both
    assert found[0]["lightly"][0]["knn200"] == 63.0 and found[0]["lightly"][1] == rerun
    # the other order keeps the first run's lightly row
    assert seed_pairs.collect("dino", [rerun, both])[0]["lightly"][0]["knn200"] == 61.0


def test_statistics_match_a_hand_computation():
    # diffs 1, -1, 0.5: mean 1/6; squared deviations 25/36 + 49/36 + 1/9 = 78/36 → var 39/36
    s = seed_pairs.summarize([1.0, -1.0, 0.5])
    assert s["mean"] == pytest.approx(1 / 6)
    assert s["sd"] == pytest.approx(math.sqrt(39 / 36))
    assert s["se"] == pytest.approx(math.sqrt(39 / 36) / math.sqrt(3))
    half = s["hi"] - s["mean"]
    assert half == pytest.approx(4.302653 * s["se"], rel=1e-5)  # t(0.975, 2 dof)
    assert s["mean"] - s["lo"] == pytest.approx(half)


def test_table_pairs_only_seeds_with_both_sides(tmp_path):
    a = write_run(tmp_path / "a", 1, [row("keel swav", 75.0, 82.0), row("lightly swav", 74.0, 83.0)])
    b = write_run(tmp_path / "b", 2, [row("keel swav", 74.0, 82.5), row("lightly swav", 75.0, 82.0)])
    c = write_run(tmp_path / "c", 3, [row("keel swav", 70.0, 80.0)])
    text = seed_pairs.table("swav", seed_pairs.collect("swav", [a, b, c]))
    assert "over 2 seeds" in text
    assert "**+0.00 / -0.25**" in text  # kNN@200 (+1 - 1) / 2, linear (-1 + 0.5) / 2
    assert "left out: 3" in text
