"""bench/gpu_check.py --smoke: every stage of the GPU check runs on the CPU (tiny Llama with llama3 rope scaling,
the Triton kernels under the interpreter, a SIMULATED memory cap) and writes its records; the sides agree."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.xdist_group("gpu_check")
def test_gpu_check_smoke_runs_every_stage(tmp_path, capsys):
    gc = _gpu_check()
    sys.path.insert(0, str(REPO / "bench"))
    rc = gc.main(["--smoke", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert all({"device", "git_commit", "command", "smoke"} <= set(r) for r in records)
    parity = {r["check"]: r["status"] for r in records if r["stage"] == "parity"}
    assert {"nf4_dequantize", "fused_lora_linear (NF4)", "lora_gated_mlp (NF4)",
            "fused_linear_cross_entropy"} <= set(parity)
    assert set(parity.values()) <= {"ok", "absent"}
    (dequant,) = [r for r in records if r["stage"] == "dequant"]
    assert dequant["cpu_smoke"] and dequant["triton_ms"] > 0 and dequant["bitsandbytes_ms"] > 0
    steps = [r for r in records if r["stage"] == "step"]
    assert {(r["side"], r["tokens"]) for r in steps} == {(s, t) for s in ("peftlab", "peft") for t in (32, 64)}
    assert all(r["same_loss"] for r in steps)  # same model, same LoRA weights, same batch: same loss
    context = {r["side"]: r for r in records if r["stage"] == "context"}
    # the simulated cap is 192 tokens: doubling 32..128, failing at 256, bisecting to the 32-token resolution
    assert all(r["simulated"] and r["longest_tokens"] == 192 and r["first_failure"] == 224 for r in context.values())
    ratios = {(r["metric"], r["vs"]) for r in records if r["stage"] == "ratio"}
    assert ("step tokens/s @ 64", "peft") in ratios and ("longest context under 24 GiB", "peft") in ratios
    assert "== ratios" in out


def test_the_architecture_is_llama_3_1_8b():
    gc = _gpu_check()
    cfg = gc.llama_config(smoke=False)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (4096, 14336, 32, 32, 8, 128256)
    shared = Path(REPO).parent / "shared" / "data" / "configs" / "llama-3.1-8b" / "config.json"
    if not shared.is_file():
        pytest.skip("../shared/data is absent: the embedded numbers are not compared with the real config")
    real = json.loads(shared.read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings"):
        assert gc.LLAMA_31_8B[key] == real[key], key
    assert gc.LLAMA_31_8B["rope_scaling"] == real["rope_scaling"]
