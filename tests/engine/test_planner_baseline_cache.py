"""The memory planner's baseline cache (estimate_baseline.json) keeps the newest BASELINE_CACHE_ENTRIES probe
figures: every fresh tokenizer path is a new key (a benchmark's temporary checkpoint each run), and the file must
not grow without bound."""
from __future__ import annotations

import importlib
import json
import subprocess
from types import SimpleNamespace

planner = importlib.import_module("peftlab.engine.planner")
builtin = importlib.import_module("peftlab.model.builtin")


def recipe(tokenizer: str) -> SimpleNamespace:
    return SimpleNamespace(
        output=SimpleNamespace(report_to=["jsonl"], plot=False),
        model=SimpleNamespace(dtype="auto", tokenizer=tokenizer, name="x", attn_implementation="sdpa",
                              gradient_checkpointing=True),
        quantization=SimpleNamespace(model_dump=lambda: {"mode": "none"}), adapter=SimpleNamespace(dropout=0.0),
        kernels="auto", train=SimpleNamespace(host_allocator="auto"))


def test_the_cache_keeps_the_newest_entries(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin, "cache_root", lambda: tmp_path)
    monkeypatch.setattr(planner, "BASELINE_CACHE_ENTRIES", 5)
    probes = []

    def fake_probe(cmd, **kw):
        probes.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=f"{1000 + len(probes)}\n", stderr="")

    monkeypatch.setattr(planner.subprocess, "run", fake_probe)
    for i in range(8):
        assert planner._probe_baseline(recipe(f"/tmp/tok-{i}")) == 1001 + i
    kept = json.loads((tmp_path / "estimate_baseline.json").read_text())
    assert sorted(kept.values()) == [1004, 1005, 1006, 1007, 1008]
    assert planner._probe_baseline(recipe("/tmp/tok-7")) == 1008 and len(probes) == 8  # the newest: cached
    assert planner._probe_baseline(recipe("/tmp/tok-0")) == 1009  # the oldest went: measured again
