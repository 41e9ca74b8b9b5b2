"""bench/vs_peers.py --smoke: peftlab and HF PEFT + TRL train the same tiny 4-bit model to the same losses,
the scaling sweep and its plot run. Needs no ../shared (built-in tokenizer, generated rows)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_vs_peers_smoke(tmp_path):
    cmd = [sys.executable, "-P", str(REPO / "bench" / "vs_peers.py"), "--smoke", "--results-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "vs_peers.jsonl").read_text().splitlines()]
    for r in records:
        assert {"device", "versions", "git_commit", "command"} <= set(r)

    (compare,) = [r for r in records if r["mode"] == "compare"]
    runs = {side: rs[0] for side, rs in compare["runs"].items()}
    assert set(runs) == {"peftlab", "peft"}
    for r in runs.values():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_mb"] > 0
        assert len(r["losses"]) == compare["steps"]
    # Same checkpoint, same initial adapter, same tokens: step 1 differs by float rounding only
    # (measured: identical to 5 decimals); step 2 adds each side's optimizer arithmetic.
    a, b = runs["peftlab"]["losses"], runs["peft"]["losses"]
    assert abs(a[0] - b[0]) <= 1e-4 * abs(b[0])
    assert abs(a[1] - b[1]) <= 1e-3 * abs(b[1])
    assert compare["agreement"]["peft"]["agree"]
    assert compare["pairs"] and compare["pairs"][0]["speed_ratio"] > 0

    scaling = [r for r in records if r["mode"] == "scaling"]
    assert {(r["seq_len"], r["side"]) for r in scaling} == {(128, s) for s in ("peftlab", "peft")}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_mb"] > 0 for r in scaling)
    assert (tmp_path / "vs_peers_scaling.png").stat().st_size > 0
