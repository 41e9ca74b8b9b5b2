"""bench/bench_cpu_threads.py --smoke: one setting trains quickstart steps in a child process and is recorded."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_cpu_threads_smoke(tmp_path):
    cmd = [sys.executable, "-P", str(REPO / "bench" / "bench_cpu_threads.py"), "--smoke", "--results-dir",
           str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (row,) = map(json.loads, (tmp_path / "bench_cpu_threads.jsonl").read_text().splitlines())
    assert row["setting"] == "2 threads, passive" and row["load"] == "idle" and row["smoke"] is True
    assert row["median_s"] > 0 and {"device", "versions", "git_commit", "command"} <= set(row)
