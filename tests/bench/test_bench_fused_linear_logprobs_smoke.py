"""The fused log-prob benchmark runs end to end at tiny sizes (--smoke, in this process: the memory figures need
one subprocess per method and are taken by the full run) and records what it measured."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts bench/ first on the path
    had_common = "common" in sys.modules  # ... and imports bench/common.py as "common"
    try:
        spec = importlib.util.spec_from_file_location("bench_fused_linear_logprobs",
                                                      BENCH / "bench_fused_linear_logprobs.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        assert bench.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    finally:
        if not had_common:
            sys.modules.pop("common", None)
    records = [json.loads(line) for line in (tmp_path / "fused_linear_logprobs.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r for r in records}
    assert set(by_method) == {"full_logits", "fused"}
    for r in records:
        assert r["smoke"] is True and r["device"].startswith("cpu") and r["git_commit"] and r["command"]
        assert r["time_s"] > 0 and r["v"] == 1000
    # the fused head and the full-logits head gave the same DPO loss, log-probs and gradient
    for key in ("loss", "logps_sum", "grad_abs_sum"):
        assert by_method["fused"][key] == pytest.approx(by_method["full_logits"][key], rel=1e-5)
