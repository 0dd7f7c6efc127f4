"""benchmarks/gpu_suite.py: the smoke run of every part, failures and overruns as rows, no-GPU rows."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def table_rows(md: str) -> list[str]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0] == "| figure | value | aim | command to reproduce alone |"
    assert lines[1] == "|---|---|---|---|"
    return lines[2:]


def test_smoke_runs_every_part_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert doc["mode"] == "smoke"
    assert [r["part"] for r in doc["rows"]] == list(gpu_suite.PARTS)
    for r in doc["rows"]:
        assert r["status"] == "smoke" and r["value"].startswith("smoke: ") and "failed" not in r["value"], r
        assert r["numbers"], r
        assert all(math.isfinite(v) and v > 0 for v in r["numbers"].values()), r
    shards = next(r for r in doc["rows"] if r["part"] == "shards_vs_synthetic")["numbers"]
    for model in ("resnet10_cifar", "vit_tiny_patch4_32"):
        ratio = shards[f"{model}_shards_img_s"] / shards[f"{model}_synthetic_img_s"]
        assert math.isclose(shards[f"{model}_ratio"], ratio)
    rows = table_rows((tmp_path / "gpu_suite.md").read_text())
    assert len(rows) == len(doc["rows"])
    assert all(line.startswith(f"| {r['figure']} | smoke: ") for line, r in zip(rows, doc["rows"]))
    assert (tmp_path / "gpu_suite_logs" / "backbones.txt").read_text()


def test_a_failing_or_overrunning_part_is_a_row_and_the_suite_goes_on(tmp_path, monkeypatch):
    write = "import json, sys; json.dump({'value': 'v', 'numbers': {'x': 2.0}}, open(sys.argv[-1], 'w'))"
    fake = {
        "broken": gpu_suite.Part("f1", "a1", 60, [], ["-c", "import sys; print('start'); sys.exit('no such figure')"],
                                 gpu_suite.read_own),
        "slow": gpu_suite.Part("f2", "a2", 1, [], ["-c", "import time; time.sleep(60)"], gpu_suite.read_own),
        "fine": gpu_suite.Part("f3", "a3", 60, [], ["-c", write], gpu_suite.read_own),
    }
    monkeypatch.setattr(gpu_suite, "PARTS", fake)
    assert gpu_suite.main(["--smoke", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    assert [(r["status"], r["value"]) for r in rows] == [
        ("failed", "failed: no such figure"), ("failed", "failed: ran past its budget of 1 s"), ("smoke", "smoke: v")]
    assert rows[1]["seconds"] < 30 and rows[2]["numbers"] == {"x": 2.0}
    assert len(table_rows((tmp_path / "gpu_suite.md").read_text())) == 3


def test_without_a_gpu_every_row_is_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_suite.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    assert [r["part"] for r in rows] == list(gpu_suite.PARTS)
    assert all(r["value"] == "not measured: no GPU" and r["numbers"] == {} for r in rows)
    assert "python benchmarks/backbones.py --device cuda" in rows[0]["command"]
    assert all("not measured: no GPU" in line for line in table_rows((tmp_path / "gpu_suite.md").read_text()))


def test_images_per_s_is_the_median_after_the_first_windows(tmp_path):
    recs = [{"step": 1, "img_per_s": 5.0}, {"step": 2, "img_per_s": 100.0}, {"step": 3, "img_per_s": 30.0},
            {"step": 3, "knn": 50.0}, {"step": 4, "img_per_s": 10.0}, {"step": 5, "img_per_s": 20.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert gpu_suite.images_per_s(tmp_path, skip=2) == 20.0   # median of 30, 10, 20
    assert gpu_suite.images_per_s(tmp_path, skip=3) == 15.0   # median of 10, 20
