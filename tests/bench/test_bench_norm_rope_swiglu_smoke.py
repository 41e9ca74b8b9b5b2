"""Smoke test: the RMSNorm, RoPE and SwiGLU benchmarks run end to end (--smoke), agree with transformers on
their inputs, and write their JSON lines. In-process (the scripts' main(argv)): a subprocess each would
cost more start-up than the three runs."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["bench_rms_norm", "bench_rope", "bench_swiglu"])
def test_bench_smoke(tmp_path, monkeypatch, capsys, name):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts bench/ first; undone afterwards
    monkeypatch.delitem(sys.modules, "common", raising=False)
    script = runpy.run_path(str(REPO / "bench" / f"{name}.py"), run_name=name)
    rows = script["main"](["--smoke", "--results-dir", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert len(records) == len(rows) > 0
    assert all({"device", "versions", "git_commit", "command", "fwd_bwd_ms"} <= r.keys() for r in records)
    assert {r["method"] for r in records} == {"transformers", "peftlab"}
    assert all(r["fwd_bwd_ms"] > 0 and r["max_abs_diff"] <= 1e-6 for r in records)
    assert "CPU figures: PyTorch path, no Triton" in capsys.readouterr().out
    sys.modules.pop("common", None)
