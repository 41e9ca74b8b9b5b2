"""bench/scale.py and bench/bench_estimate.py run end to end at tiny sizes (--smoke) and record what they measured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, tmp_path: Path) -> list[dict]:
    cmd = [sys.executable, "-P", str(REPO / "bench" / script), "--smoke", "--threads", "1", "--results-dir",
           str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    name = "scale" if script == "scale.py" else "bench_estimate"
    records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    for r in records:
        assert {"device", "versions", "git_commit", "command"} <= set(r) and r["smoke"] is True
    return records


@pytest.mark.slow
def test_scale_smoke(tmp_path):
    rows = {r["phase"]: r for r in _run("scale.py", tmp_path)}
    assert set(rows) == {"load-peftlab", "load-transformers", "train"}
    for r in rows.values():
        assert r["peak_rss_gb"] > 0.1 and not r.get("over_limit")
    assert rows["load-peftlab"]["model_gb"] > 0 and rows["load-transformers"]["model_gb"] > 0
    train = rows["train"]
    assert len(train["steps"]) == 2 and train["tokens_per_s"] > 0 and train["predicted_gb"] > 0
    assert abs(train["prediction_error"]) < 0.5  # the real figure is the full run's (bench/RESULTS.md)


@pytest.mark.slow
def test_bench_estimate_smoke(tmp_path):
    rows = _run("bench_estimate.py", tmp_path)
    assert [r["ckpt"] for r in rows] == [False, True]
    for r in rows:
        assert r["measured_gb"] > 0.1 and r["predicted_gb"] > 0.1 and r["error"] is not None
        assert sum(r["predicted"].values()) == pytest.approx(r["predicted_gb"], rel=1e-6)
