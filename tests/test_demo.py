"""keel demo end to end, shortened: the report, the table and the pictures are there."""
from __future__ import annotations

import json

from PIL import Image

from keel.demo import run_demo


def test_demo_writes_report_and_pictures(tmp_path, capsys):
    run = tmp_path / "demo"
    report = run_demo(epochs=2, run_dir=str(run), device="cpu",
                      overrides=["data.img_size=8", "eval.linear_epochs=5", "train.knn_every=1"])
    out = capsys.readouterr().out
    assert "pretrained (SimCLR)" in out and "random init" in out
    saved = json.loads((run / "demo_report.json").read_text())
    assert saved["rows"] == report["rows"]
    for row in saved["rows"].values():
        assert set(row) == {"kNN@20", "kNN@200", "linear"} and all(0 <= v <= 100 for v in row.values())
    for png in ("demo_accuracy.png", "curves.png"):
        with Image.open(run / png) as im:
            assert im.width > 300 and im.height > 200
            # a real plot, not a blank canvas
            assert len(im.convert("L").histogram()) and sum(1 for c in im.convert("L").histogram() if c) > 10
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history if "knn_top1" in h] == [1, 2]
