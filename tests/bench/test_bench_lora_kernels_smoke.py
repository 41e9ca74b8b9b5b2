"""Smoke test: the NF4 and fused-LoRA benchmarks run end to end (--smoke) and write their JSON lines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("script, name", [("bench_nf4.py", "bench_nf4"),
                                          ("bench_fused_lora_linear.py", "bench_fused_lora_linear")])
def test_bench_smoke(tmp_path, script, name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert records and all({"device", "versions", "git_commit", "command"} <= r.keys() for r in records)
    assert {r["method"] for r in records} == ({"bitsandbytes", "peftlab"} if name == "bench_nf4" else
                                              {"peft", "peftlab"})
    if name == "bench_nf4":
        assert "parity (bitwise vs bitsandbytes): PASS" in proc.stdout
        assert all(r["bitwise_equal"] for r in records)
    else:
        assert all(r["fwd_bwd_ms"] > 0 for r in records)
