"""The fused-loss benchmarks run end to end at tiny sizes (--smoke) and record what they measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "head_dtype"), [("fused_linear_cross_entropy", "bfloat16"),
                                                  ("fused_linear_kd_loss", None)])
def test_bench_smoke(name, head_dtype, tmp_path):
    """The CE's smoke runs model.frozen_16bit's case (a bf16 head: the online path, and the row chunks beside it);
    the KD's the fp32 default (both benchmarks share the sweep and its --head-dtype)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    extra = ["--head-dtype", head_dtype] if head_dtype else []
    proc = subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py"), "--smoke", "--results-dir",
                           str(tmp_path), *extra], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak_rss_mb" in proc.stdout  # the table header
    records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    by_method = {r["method"]: r for r in records}
    assert set(by_method) == {"inputs", "unfused", "fused"} | ({"fused_rows"} if head_dtype else set())
    assert all(r["head_dtype"] == (head_dtype or "float32") for r in records)
    if head_dtype:  # the online path and the row chunks it replaced computed the same loss
        assert by_method["fused_rows"]["loss"] == pytest.approx(by_method["fused"]["loss"], rel=1e-5)
    for r in records:
        assert r["smoke"] is True and r["device"].startswith("cpu") and r["git_commit"] and r["command"]
        assert r["versions"]["torch"] and r["peak_rss_mb"] > 0
    # the fused path and the plain PyTorch baseline computed the same loss
    assert by_method["fused"]["loss"] == pytest.approx(by_method["unfused"]["loss"], rel=1e-4)
    assert by_method["fused"]["time_s"] > 0 and "above_inputs_mb" in by_method["fused"]
