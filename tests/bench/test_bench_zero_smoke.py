"""bench/bench_zero.py --smoke: one process, ZeRO-2 and ZeRO-3 on 2 gloo ranks train micro-llama end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.xdist_group("deepspeed")
def test_bench_zero_smoke(tmp_path):
    cmd = [sys.executable, "-P", str(REPO / "bench" / "bench_zero.py"), "--smoke", "--results-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    rows = {r["config"]: r for r in map(json.loads, (tmp_path / "bench_zero.jsonl").read_text().splitlines())}
    assert set(rows) == {"single", "zero2", "zero3"}
    for r in rows.values():
        assert {"device", "versions", "git_commit", "command"} <= set(r) and r["smoke"] is True
        assert r["steps_per_s"] > 0 and all(x > 50 for x in r["peak_rss_mib_per_rank"])
    assert len(rows["zero2"]["peak_rss_mib_per_rank"]) == 2 and len(rows["zero3"]["peak_rss_mib_per_rank"]) == 2
    # same recipe and seed: both ZeRO stages on 2 ranks end where the single process does
    for config in ("zero2", "zero3"):
        assert rows[config]["final_loss"] == pytest.approx(rows["single"]["final_loss"], rel=1e-5)
