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


def test_bf16_parity_passes_normwise_where_only_the_rounding_order_differs():
    """bf16 sums of ±20-sized terms near zero differ by rounding order alone (the GPU's dequant + cuBLAS path rounds
    x·Wᵀ before adding the LoRA term): elementwise allclose fails, the normwise bound passes; a real bug does not."""
    import torch

    gc = _gpu_check()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4000, generator=g) * 8
    lora = -base + torch.randn(4000, generator=g) * 3  # sums near zero next to ±20-sized terms
    ref = (base + lora).to(torch.bfloat16)  # one rounding of the exact sum
    fused = (base.to(torch.bfloat16) + lora.to(torch.bfloat16)).to(torch.bfloat16)  # the base rounded first
    row = gc.compare([fused], [ref], False, "bfloat16")
    assert not row["elementwise"] and row["status"] == "ok (normwise)" and row["rel_l2_err"] < 1e-2
    missing_lora = base.to(torch.bfloat16)
    assert gc.compare([missing_lora], [ref], False, "bfloat16")["status"] == "MISMATCH"
    off_by_one_row = torch.roll(ref, 1)
    assert gc.compare([off_by_one_row], [ref], False, "bfloat16")["status"] == "MISMATCH"
    # fp32 stays elementwise at the tests' tolerances, and bit-exact checks stay bit-exact
    assert gc.compare([fused.float()], [ref.float()], False, "float32")["status"] == "MISMATCH"
    assert gc.compare([ref], [ref.clone()], True, "bfloat16")["status"] == "ok"
    assert gc.compare([fused], [ref], True, "bfloat16")["status"] == "MISMATCH"


class _Model:
    def __init__(self) -> None:
        self.zeroed = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zeroed += 1

    def modules(self):
        return iter(())


def test_context_search_takes_cuda_oom_errors_as_a_fit_and_stops_at_other_errors():
    """Under the cap an out-of-memory can come as a RuntimeError (cuBLAS workspace, pinned host buffer): it is an
    "oom" try. Any other failure ends the search with the error and keeps what fitted; the doubling's last try is the
    model's max_position_embeddings."""
    from types import SimpleNamespace

    import torch

    gc = _gpu_check()
    gc._import_peftlab()
    config = SimpleNamespace(vocab_size=11, max_position_embeddings=48)

    def side(fail):
        def step(batch):
            fail(batch["input_ids"].shape[1])
            return 1.0
        return {"model": _Model(), "step": step}

    def oom_above(n, exc):
        def fail(seq):
            if seq > n:
                raise exc
        return fail

    cpu = torch.device("cpu")
    res = gc.longest_context(side(oom_above(100, RuntimeError("CUDA error: out of memory"))), config, cpu,
                             gc.Budget(60), False, start=4, granularity=4)
    assert res["longest_tokens"] == 48 and res["first_failure"] is None and res["error"] is None
    assert [s for s, _, _ in res["tries"]] == [4, 8, 16, 32, 48]  # clamped to the model's positions
    res = gc.longest_context(side(oom_above(20, torch.OutOfMemoryError("cap"))), config, cpu, gc.Budget(60), False,
                             start=4, granularity=4)
    assert (res["longest_tokens"], res["first_failure"], res["error"]) == (20, 24, None)
    res = gc.longest_context(side(oom_above(20, ValueError("a bug"))), config, cpu, gc.Budget(60), False, start=4,
                             granularity=4)
    assert res["longest_tokens"] == 16 and res["tries"][-1] == (32, "error", 0.0)
    assert res["error"].startswith("error: ValueError: a bug (at 32 tokens)")
    # the hard stop (timeout's SIGINT) mid-search: what fitted is returned, marked, for the caller to record first
    res = gc.longest_context(side(oom_above(20, KeyboardInterrupt())), config, cpu, gc.Budget(60), False, start=4,
                             granularity=4)
    assert res["interrupted"] and res["longest_tokens"] == 16 and res["tries"][-1] == (32, "interrupted", 0.0)


@pytest.mark.slow
@pytest.mark.xdist_group("gpu_check")
def test_a_failing_stage_or_side_does_not_cost_the_others(tmp_path, capsys, monkeypatch):
    """One side whose step fails, a dequant that fails and a long-context peftlab side that cannot be built: each is
    reported, every other figure is still measured, the context falls back to peftlab without offload, the ratio
    table is printed, and the exit code says something failed."""
    gc = _gpu_check()
    sys.path.insert(0, str(REPO / "bench"))
    real_peft, real_peftlab = gc.peft_side, gc.peftlab_side

    def peft_side(*a, **kw):
        side = real_peft(*a, **kw)
        step = side["step"]

        def failing(batch):
            if batch["input_ids"].shape[1] == 64:
                raise RuntimeError("peer broke at 64")
            return step(batch)
        return {**side, "step": failing}

    def peftlab_side(*a, long_context=False, **kw):
        if long_context:
            raise RuntimeError("offload broke")
        return real_peftlab(*a, **kw)

    def dequant_speed(*a):
        raise RuntimeError("dequant broke")

    monkeypatch.setattr(gc, "peft_side", peft_side)
    monkeypatch.setattr(gc, "peftlab_side", peftlab_side)
    monkeypatch.setattr(gc, "dequant_speed", dequant_speed)
    rc = gc.main(["--smoke", "--results-dir", str(tmp_path), "--skip", "parity"])
    out = capsys.readouterr().out
    assert rc == 1 and "== ratios" in out and "FAILED: 4 problems" in out, out
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    (dq,) = [r for r in records if r["stage"] == "dequant"]
    assert dq["status"] == "error: RuntimeError: dequant broke"
    steps = {(r["side"], r["tokens"]): r for r in records if r["stage"] == "step"}
    assert steps[("peft", 64)]["status"].startswith("error: RuntimeError: peer broke at 64")
    assert all("median_s" in steps[k] for k in (("peftlab", 32), ("peftlab", 64), ("peft", 32)))
    context = {r["side"]: r for r in records if r["stage"] == "context"}
    assert context["peftlab"]["error"].startswith("error: RuntimeError: offload broke")
    # the peer's step stage failure is at 64 tokens: its context search stops there with the error too
    assert context["peft"]["longest_tokens"] == 32 and context["peft"]["error"]
    assert context["peftlab (no offload)"]["longest_tokens"] == 192
    ratios = {(r["metric"], r["vs"]) for r in records if r["stage"] == "ratio"}
    assert ("step tokens/s @ 32", "peft") in ratios and ("step tokens/s @ 64", "peft") not in ratios
    assert ("longest context under 24 GiB", "peft (peftlab (no offload))") in ratios


def test_a_long_context_side_that_fits_nothing_falls_back_to_peftlab_without_offload(monkeypatch):
    """A pinned host buffer the machine refuses reads as out of memory at every length: the long-context side fits
    nothing, its first out-of-memory message is kept, and peftlab without the long-context keys gets the budget."""
    from types import SimpleNamespace

    import torch

    gc = _gpu_check()
    gc._import_peftlab()
    config = SimpleNamespace(vocab_size=11, max_position_embeddings=131072)

    def peftlab_side(config, device, smoke, fused_blocks=True, long_context=False):
        def step(batch):
            if long_context:
                raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
            if batch["input_ids"].shape[1] > 70000:
                raise torch.OutOfMemoryError("cap")
            return 1.0
        return {"model": _Model(), "step": step}

    monkeypatch.setattr(gc, "peftlab_side", peftlab_side)
    rows, problems = [], []
    out = gc.context_stage({}, config, torch.device("cpu"), gc.Budget(60), False, rows.extend, problems)
    assert out == rows and [r["side"] for r in rows] == ["peftlab", "peftlab (no offload)"] and problems == []
    lc, plain = rows
    assert lc["longest_tokens"] == 0 and [s for s, _, _ in lc["tries"]] == [32768, 16384, 8192, 4096]
    assert lc["first_oom"] == "RuntimeError at 32768 tokens: CUDA error: out of memory (cudaHostAlloc)"
    # doubling from 32k to the model's 131072 positions, then bisecting to 4k
    assert (plain["longest_tokens"], plain["first_failure"], plain["resolution"]) == (69632, 73728, 4096)


def test_liger_module_level_patches_apply_to_the_liger_side_only():
    """Liger rebinds names of transformers' modeling module for every model (RoPE, RMSNorm, MLP classes): they are
    taken back at once and set only while the Liger side steps, so the HF and per-module sides stay HF's."""
    import types

    gc = _gpu_check()
    modeling = types.ModuleType("modeling_fake")
    modeling.apply_rotary_pos_emb = hf_rope = object()

    def liger_apply():
        modeling.apply_rotary_pos_emb = "liger rope"
        modeling.LigerOnly = "new name"

    patched = gc.take_back_module_patches(modeling, liger_apply)
    assert patched == {"apply_rotary_pos_emb": "liger rope", "LigerOnly": "new name"}
    assert modeling.apply_rotary_pos_emb is hf_rope and not hasattr(modeling, "LigerOnly")
    with pytest.raises(RuntimeError), gc.module_patched(modeling, patched):
        assert modeling.apply_rotary_pos_emb == "liger rope" and modeling.LigerOnly == "new name"
        raise RuntimeError("a failing step restores the module too")
    assert modeling.apply_rotary_pos_emb is hf_rope and not hasattr(modeling, "LigerOnly")


@pytest.mark.slow
def test_the_shell_wrapper_checks_the_packages_and_passes_the_options_on(tmp_path):
    """bench/gpu_check.sh as the operator runs it (its package check, the import preflight that prints the versions,
    the options passed through); the stages are skipped here, the smoke test above runs them."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--skip",
                           "parity,dequant,step,context", "--results-dir", str(tmp_path)],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_check.sh: torch " in proc.stdout and "pydantic " in proc.stdout and "gpu_check: ok" in proc.stdout


def test_the_memory_cap_names_a_device_index_and_is_lifted_after_a_failure(monkeypatch):
    """torch.cuda.set_per_process_memory_fraction refuses torch.device("cuda") (no index) with a ValueError, which
    would have ended the context stage on the GPU; the cap names the index, is 24 GiB of the card, and is lifted
    when the search inside fails."""
    from types import SimpleNamespace

    import torch
    from torch.cuda._utils import _get_device_index

    gc = _gpu_check()
    calls = []

    def set_fraction(fraction, device=None):
        calls.append((round(fraction, 4), _get_device_index(device)))  # torch's own check of the argument

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=143771 * 2**20) if i == 0 else None)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    with pytest.raises(RuntimeError), gc.memory_cap(torch.device("cuda"), 24.0):
        assert calls == [(round(24 * 1024 / 143771, 4), 0)]
        raise RuntimeError("a failed search")
    assert calls[-1] == (1.0, 0)
    with gc.memory_cap(torch.device("cpu"), 24.0):
        pass
    assert len(calls) == 2
