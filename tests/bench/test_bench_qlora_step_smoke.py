"""bench/bench_qlora_step.py --smoke: both sides train the same tiny 4-bit model to the same loss."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_qlora_step_smoke(tmp_path):
    cmd = [sys.executable, "-P", str(REPO / "bench" / "bench_qlora_step.py"), "--smoke", "--results-dir",
           str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "bench_qlora_step.jsonl").read_text().splitlines()]
    assert {"device", "versions", "git_commit", "command"} <= set(record)
    rows = {r["side"]: r for r in record["rows"]}
    assert set(rows) == {"peftlab", "peft"}
    # the comparison is fair only if both sides compute the same loss on the same model and batch
    assert abs(rows["peftlab"]["loss"] - rows["peft"]["loss"]) < 1e-3
    assert rows["peftlab"]["tokens_per_s"] > 0 and record["speedup"] > 0
