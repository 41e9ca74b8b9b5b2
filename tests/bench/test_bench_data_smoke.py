"""bench/bench_data.py --smoke runs (never skips: without ../shared/data it uses generated rows)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_data_smoke(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "bench_data.py"), "--smoke", "--results-dir", str(tmp_path),
           "--data", str(tmp_path / "absent")]  # force the generated-rows path: same on every machine
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "packing_efficiency" in out.stdout and "tokens_per_s" in out.stdout
    records = [json.loads(line) for line in (tmp_path / "bench_data.jsonl").read_text().splitlines()]
    assert [r["max_seq_len"] for r in records] == [512, 1024]
    for r in records:
        assert {"device", "versions", "git_commit", "command"} <= set(r)
        assert 0.5 < r["packing_efficiency"] <= 1.0 and 0.0 <= r["padding_waste_dynamic"] < 1.0
        assert r["samples"] > 250 and r["tokens_per_s"] > 0
