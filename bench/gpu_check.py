#!/usr/bin/env python3
"""One prepared GPU check (issue 18): kernel parity on the device, the 8B QLoRA step vs HF PEFT, 24 GB context.

Run it through ``bench/gpu_check.sh`` on a lent GPU (≤ 8 minutes, ``--budget-s``); ``--smoke`` runs every stage
on the CPU in seconds (tiny model, Triton under the interpreter, a SIMULATED memory cap) and is what the suite
runs (tests/bench/test_gpu_check_smoke.py). Stages, each skipped with a note when the budget is spent:

1. **parity** — every Triton kernel against its PyTorch reference on the device, fp32 and bf16, odd shapes,
   forward and input gradients, at the tolerances of tests/kernels (fp32 atol 1e-5 / rtol 5e-4; bf16 against
   the fp32 reference of the same bf16 inputs, atol 5e-3 / rtol 5e-2; NF4 dequant bit for bit). Kernels of
   modules not in this checkout are listed as absent.
   **dequant** — Triton vs bitsandbytes NF4 dequant of the 8B MLP weight (which the block Functions should use).
2. **step** — the Llama-3.1-8B architecture (numbers below; all 32 layers), random init made on the GPU and
   quantised as it is made (NF4, double quant, bf16 compute; ``peftlab.model.quantized_load.random_quantized``,
   seed 0) ONCE: every side is a deep copy of the module tree over the same frozen weight tensors. LoRA r=16 /
   alpha 32 on all linear layers with the same (non-zero) LoRA weights, non-reentrant gradient checkpointing,
   one sequence of 2k and of 8k tokens:
   **peftlab** (``train.fused_blocks: true``, kernels auto, fused linear cross-entropy), **peftlab-per-module**
   (the same with ``fused_blocks: false``: what the blocks themselves gain) vs **peft** (HF PEFT on
   transformers' model with bitsandbytes Linear4bit, ``model(labels=...)``) and **liger** (the peft side with
   Liger's kernels, only when ``liger_kernel`` imports). Forward + backward, alternating sides, one warm-up;
   medians; step peak memory = ``max_memory_allocated`` above the model; the losses must agree (relative 1e-3).
3. **context** — per side alone on the device under a 24 GiB cap
   (``torch.cuda.set_per_process_memory_fraction``), the longest single sequence whose step fits: doubling from
   4k, then bisecting to 4k tokens, while the budget lasts.

Prints one table of ratios (peftlab over each peer) and appends JSON lines to bench/results/gpu_check.jsonl
(``--results-dir``). Never reports a figure it did not measure: skipped stages say so.

    bash bench/gpu_check.sh                       # on a GPU
    python -P bench/gpu_check.py --smoke          # CPU, seconds
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json; public numbers, embedded because the device machine has
# no ../shared/data).
LLAMA_31_8B: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
# The same shape of model in miniature for --smoke (llama3 rope scaling kept: the code path is the same).
SMOKE_CONFIG: dict[str, Any] = {
    **LLAMA_31_8B, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16384,
    "bos_token_id": 1, "eos_token_id": 2,
    "rope_scaling": {**LLAMA_31_8B["rope_scaling"], "original_max_position_embeddings": 256},
}
CAP_GIB = 24.0
SMOKE_CAP_TOKENS = 192  # --smoke: a SIMULATED cap (a step above this many tokens raises OutOfMemoryError)
LORA_R, LORA_ALPHA = 16, 32
TOL = {"float32": {"atol": 1e-5, "rtol": 5e-4}, "bfloat16": {"atol": 5e-3, "rtol": 5e-2}}


def _import_peftlab() -> None:
    """Make ``peftlab`` and ``peftlab.kernels`` importable from a plain checkout (an install maps the package onto
    peftlab/ and kernels/). The repository root is never put on sys.path: its kernels/ folder would shadow the
    third-party module of that name that bitsandbytes imports."""
    for name, folder in (("peftlab", REPO / "peftlab"), ("peftlab.kernels", REPO / "kernels")):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


class Budget:
    """Wall-clock budget of the whole check; stages ask before starting work they may not finish."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


# ----------------------------------------------------------------------------------------- 1. parity
def _leaf(t, dtype, requires_grad=True):
    # a copy: kernels that work in place (SwiGLU backward, RoPE) must not touch the other side's inputs
    return t.detach().to(dtype).clone().requires_grad_(requires_grad)


def _parity_cases(device, dtype, smoke: bool) -> dict[str, Callable[[], tuple | None]]:
    """name -> () -> (kernel outputs + input grads, reference outputs + grads, bitwise?) or None if absent.

    Both sides of a case get the same inputs; the reference runs in fp32 on the inputs rounded to ``dtype``
    (the tests/kernels rule), the (Q)LoRA references in ``dtype`` as their tests do.
    """
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    def run_in(dt, fn, inputs, **kw):
        leaves = [_leaf(t, dt) for t in inputs]
        out = fn(*leaves, **kw)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point()]
        scalar = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in outs)
        grads = torch.autograd.grad(scalar, leaves, allow_unused=True)
        return [o.detach() for o in outs] + [x.detach() for x in grads if x is not None]

    def pair(fused, ref, inputs, ref_dtype=torch.float32, **kw):
        rounded = [t.to(dtype) for t in inputs]
        return (run_in(dtype, fused, rounded, backend="triton", **kw), run_in(ref_dtype, ref, rounded, **kw), False)

    def kernel(module: str):
        try:
            return importlib.import_module(f"peftlab.kernels.{module}")
        except ImportError:
            return None

    m, k, n, r = (9, 40, 24, 4) if smoke else (333, 1000, 1544, 16)
    v = 123 if smoke else 32003
    labels = torch.randint(0, v, (m,), generator=g).to(device)
    cases: dict[str, Callable[[], tuple | None]] = {}

    ce = kernel("fused_linear_cross_entropy")
    opts = {"label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 30.0}
    cases["fused_linear_cross_entropy"] = lambda: ce and pair(
        lambda h, w, **kw: ce.fused_linear_cross_entropy(h, w, labels, **kw),
        lambda h, w, **kw: ce.reference_linear_cross_entropy(h, w, labels, **kw),
        [rnd(m, k // 8), rnd(v, k // 8, scale=0.2)], **opts)

    kd = kernel("fused_linear_kd_loss")
    teacher = [rnd(m, k // 10), rnd(v, k // 10, scale=0.2)]
    cases["fused_linear_kd_loss"] = lambda: kd and pair(
        lambda h, w, **kw: kd.fused_linear_kd_loss(h, w, teacher[0].to(h.dtype), teacher[1].to(h.dtype), labels,
                                                   **kw),
        lambda h, w, **kw: kd.reference_linear_kd_loss(h, w, teacher[0].to(dtype).float(),
                                                       teacher[1].to(dtype).float(), labels, **kw),
        [rnd(m, k // 8), rnd(v, k // 8, scale=0.2)], kind="jsd")

    lp = kernel("fused_linear_logprobs")
    lp_labels = torch.randint(0, v, (3, m), generator=g).to(device)
    lp_labels[:, :2] = -100
    cases["fused_linear_sequence_logprobs"] = lambda: lp and pair(
        lambda h, w, **kw: lp.fused_linear_sequence_logprobs(h, w, lp_labels, **kw),
        lambda h, w, **kw: lp.reference_linear_sequence_logprobs(h, w, lp_labels, **kw),
        [rnd(3, m, k // 8), rnd(v, k // 8, scale=0.2)])

    rms = kernel("rms_norm")
    cases["rms_norm"] = lambda: rms and pair(
        lambda x, w, **kw: rms.rms_norm(x, w, 1e-6, **kw), lambda x, w, **kw: rms.reference_rms_norm(x, w, 1e-6, **kw),
        [rnd(3, m, k), rnd(k, scale=0.1) + 1])

    sw = kernel("swiglu")
    cases["swiglu"] = lambda: sw and pair(sw.swiglu, sw.reference_swiglu, [rnd(m, k), rnd(m, k)])

    rope = kernel("rope")
    hd = 16 if smoke else 128
    pos = torch.arange(m, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)[None].to(device)

    def rotate(fn):
        def call(q, k_, **kw):  # in place: rotate copies so the leaves keep their values
            return fn(q.clone(), k_.clone(), emb.cos().to(q.dtype), emb.sin().to(q.dtype), **kw)
        return call
    cases["apply_rope_"] = lambda: rope and pair(rotate(rope.apply_rope_), rotate(rope.reference_apply_rope_),
                                                 [rnd(2, 4, m, hd), rnd(2, 2, m, hd)])

    import bitsandbytes as bnb

    nf4 = kernel("nf4")
    fll = kernel("fused_lora_linear")
    block = kernel("fused_lora_block")

    def linear4bit(i, o, seed):
        w = torch.randn(o, i, generator=torch.Generator().manual_seed(seed)) * 0.05
        lin = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4")
        return lin.to(device)

    base = linear4bit(k, n, 1)
    cases["nf4_dequantize"] = lambda: (
        [nf4.nf4_dequantize(base.weight, base.weight.quant_state, out_dtype=dtype, backend="triton")],
        [nf4.reference_nf4_dequantize(base.weight, base.weight.quant_state, out_dtype=dtype)], True)
    lora = [rnd(r, k, scale=0.1), rnd(n, r, scale=0.1)]

    def lora_linear(fn):
        def call(x, a, b, **kw):
            return fn(x, base, a.float(), b.float(), 2.0, **kw)
        return call
    cases["fused_lora_linear (NF4)"] = lambda: pair(
        lora_linear(fll.fused_lora_linear), lora_linear(fll.reference_lora_linear), [rnd(m, k), *lora], dtype)
    # up to FUSED_IN_TILE_MAX_ROWS tokens the GPU runs the in-tile-dequant GEMMs (more: dequant + cuBLAS)
    small_m = min(m, fll.FUSED_IN_TILE_MAX_ROWS - 51)
    cases["fused_lora_linear (NF4 in-tile)"] = lambda: pair(
        lora_linear(fll.fused_lora_linear), lora_linear(fll.reference_lora_linear), [rnd(small_m, k), *lora], dtype)
    gate, up, down = linear4bit(k, n, 2), linear4bit(k, n, 3), linear4bit(n, k, 4)

    def mlp(fn):
        def call(x, ag, bg, ad, bd, **kw):
            return fn(x, block.LoraProjection(gate, ag.float(), bg.float(), 2.0), block.LoraProjection(up),
                      block.LoraProjection(down, ad.float(), bd.float(), 2.0), **kw)
        return call
    cases["lora_gated_mlp (NF4)"] = lambda: pair(
        mlp(block.lora_gated_mlp), mlp(block.reference_lora_gated_mlp),
        [rnd(m, k), *lora, rnd(r, n, scale=0.1), rnd(k, r, scale=0.1)], dtype)
    return cases


# --smoke runs these (the dequant, the QLoRA layer and block, the loss); `--parity all` runs every check on the
# CPU too (about a minute under the interpreter: tests/kernels already runs them there).
SMOKE_PARITY = ("nf4_dequantize", "fused_lora_linear (NF4)", "lora_gated_mlp (NF4)", "fused_linear_cross_entropy")


def parity(device, smoke: bool, budget: Budget, only: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    import torch

    rows = []
    # --smoke: fp32 only (the interpreter's bf16 runs are tests/kernels' job; the smoke checks this harness)
    for dtype in (torch.float32,) if smoke else (torch.float32, torch.bfloat16):
        name_dt = str(dtype).removeprefix("torch.")
        cases = _parity_cases(device, dtype, smoke)
        for name, case in cases.items():
            if only is not None and name not in only:
                continue
            if budget.left() < 0:
                rows.append({"check": name, "dtype": name_dt, "status": "skipped: time"})
                continue
            t0 = time.perf_counter()
            try:
                got = case()
            except Exception as exc:  # noqa: BLE001 - a failing kernel is a result of this check, not its end
                rows.append({"check": name, "dtype": name_dt, "status": f"error: {type(exc).__name__}: {exc}"[:300]})
                continue
            if got is None:
                rows.append({"check": name, "dtype": name_dt, "status": "absent"})
                continue
            fused, ref, bitwise = got
            worst, ok = 0.0, len(fused) == len(ref)
            for a, b in zip(fused, ref):
                a, b = a.float(), b.float()
                worst = max(worst, float((a - b).abs().max()) if a.numel() else 0.0)
                if bitwise:
                    ok &= torch.equal(a, b)
                else:
                    ok &= bool(torch.allclose(a, b, **TOL[name_dt]))
            rows.append({"check": name, "dtype": name_dt, "tensors": len(fused), "max_abs_err": worst,
                         "status": "ok" if ok else "MISMATCH", "seconds": round(time.perf_counter() - t0, 2)})
    return rows


def dequant_speed(device, smoke: bool) -> dict[str, Any]:
    """Median ms of dequantising the 8B MLP weight (14336 x 4096, NF4 double quant) to bf16: our Triton kernel
    vs bitsandbytes' CUDA kernel (issue 18 asks the block Functions to use the faster one)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from common import median_time_ms
    from peftlab.kernels.nf4 import nf4_dequantize

    shape = (64, 128) if smoke else (14336, 4096)
    dtype = torch.float32 if smoke else torch.bfloat16
    w = bnb.nn.Params4bit(torch.randn(shape) * 0.02, requires_grad=False, compress_statistics=True,
                          quant_type="nf4").to(device)
    ours = median_time_ms(lambda: nf4_dequantize(w, w.quant_state, out_dtype=dtype, backend="triton"),
                          iters=3 if smoke else 20)
    theirs = median_time_ms(lambda: bnbF.dequantize_4bit(w.data, w.quant_state).to(dtype),
                            iters=3 if smoke else 20)
    return {"shape": f"{shape[0]}x{shape[1]}", "triton_ms": ours, "bitsandbytes_ms": theirs,
            "cpu_smoke": smoke}  # --smoke: the interpreter on a tiny weight, not a figure


# ----------------------------------------------------------------------------------------- 2. the step
def llama_config(smoke: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**copy.deepcopy(SMOKE_CONFIG if smoke else LLAMA_31_8B))  # transformers edits the dicts


_BASE: dict[str, Any] = {}  # the one random 4-bit model every side shares its frozen weights with


def base_model(config, device):
    """A side's own module tree over ONE shared set of frozen 4-bit weights.

    The random NF4 model is made once (building an 8B model per side would cost a minute each); each side
    gets a deep copy whose parameters are the same tensors (frozen: nobody writes them), so LoRA wrappers,
    instance forwards and hooks stay per side while the weights are held once.
    """
    import torch

    from peftlab.model.quantized_load import QuantSettings, random_quantized

    if "model" not in _BASE:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        _BASE["model"] = random_quantized(config, QuantSettings("nf4", True, 64, dtype), seed=0, device=device)
    base = _BASE["model"]
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


def release_base() -> None:
    _BASE.clear()


def set_lora_values(tensors: dict[str, tuple[Any, Any]]) -> None:
    """Deterministic non-zero LoRA weights keyed by module name (B = 0 would hide the LoRA path from the loss)."""
    import torch

    for i, name in enumerate(sorted(tensors)):
        a, b = tensors[name]
        g = torch.Generator(device="cpu").manual_seed(1000 + i)
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=g) / math.sqrt(a.shape[1]))
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)


def peftlab_side(config, device, smoke: bool, fused_blocks: bool = True):
    from peftlab.adapters.fused_blocks import apply_fused_blocks
    from peftlab.adapters.lora_inject import lora_modules
    from peftlab.model.load import attach_adapters, enable_gradient_checkpointing
    from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss, count_targets
    from peftlab.recipe.parse import recipe_from_dict

    model = base_model(config, device)
    recipe = recipe_from_dict({
        "model": {"name": "unused", "gradient_checkpointing": True},
        "quantization": {"mode": "nf4", "double_quant": True},
        "adapter": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0},
        "data": {"train": ["unused.jsonl"]},
        "train": {"device": device.type, "fused_blocks": fused_blocks},
        "kernels": "torch" if smoke else "auto",  # smoke: bitsandbytes' dequant (the interpreter is slow)
    })
    attach_adapters(model, recipe, device)  # the same calls as peftlab.model.load.build_model
    fallbacks = apply_fused_blocks(model) if fused_blocks else {}
    enable_gradient_checkpointing(model)
    lora = {n: (m.lora_A.weight, m.lora_B.weight) for n, m in lora_modules(model).items()}
    set_lora_values(lora)
    model.train()
    settings = LossSettings(backend="auto")

    def step(batch) -> float:
        loss = causal_lm_loss(model, batch, normalizer=count_targets(batch), settings=settings)
        loss.backward()
        return float(loss.detach())

    return {"model": model, "step": step, "fallbacks": fallbacks, "lora_names": sorted(lora)}


def peft_side(config, device, liger: bool = False):
    from peft import LoraConfig, get_peft_model
    from torch import nn

    model = base_model(config, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear"))
    # the same LoRA values as peftlab's side: module names match once PEFT's prefix and adapter name are dropped
    lora = {name.removeprefix("base_model.model."): (m.lora_A["default"].weight, m.lora_B["default"].weight)
            for name, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and "default" in m.lora_A}
    set_lora_values(lora)
    model.train()

    def step(batch) -> float:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        return float(out.loss.detach())

    return {"model": model, "step": step, "fallbacks": {}, "lora_names": sorted(lora)}


def _batch(vocab: int, seq: int, device):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 8] = -100  # a prompt part, as in SFT
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def one_step(side, batch, device) -> tuple[float, float, int]:
    """(seconds, loss, step peak bytes above what was allocated before) of one forward + backward."""
    import torch

    side["model"].zero_grad(set_to_none=True)
    _sync(device)
    before = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = side["step"](batch)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else 0
    side["model"].zero_grad(set_to_none=True)
    return seconds, loss, peak


def step_comparison(sides, config, seqs, iters, device, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for seq in seqs:
        batch = _batch(config.vocab_size, seq, device)
        times = {k: [] for k in sides}
        losses, peaks = {}, {k: 0 for k in sides}
        for it in range(iters + 1):  # round 0 is the warm-up (Triton compiles, cuBLAS heuristics)
            if it > 1 and budget.left() < 0:
                break
            for name, side in sides.items():  # alternating A/B/C, A/B/C...
                seconds, losses[name], peak = one_step(side, batch, device)
                peaks[name] = max(peaks[name], peak)
                if it:
                    times[name].append(seconds)
        for name in sides:
            if not times[name]:
                rows.append({"stage": "step", "side": name, "tokens": seq, "status": "skipped: time"})
                continue
            med = statistics.median(times[name])
            rows.append({"stage": "step", "side": name, "tokens": seq, "median_s": med, "tokens_per_s": seq / med,
                         "step_peak_mb": peaks[name] / 2**20, "loss": losses[name], "iters": len(times[name])})
        ref = losses.get("peftlab")
        for row in rows[-len(sides):]:
            if ref is not None and "loss" in row:
                row["loss_rel_diff"] = abs(row["loss"] - ref) / max(abs(ref), 1e-12)
                row["same_loss"] = row["loss_rel_diff"] <= 1e-3
    return rows


# -------------------------------------------------------------------------------------- 3. context
def longest_context(side, config, device, budget: Budget, smoke: bool, start: int = 4096,
                    granularity: int = 4096) -> dict[str, Any]:
    """Longest single-sequence step that fits: doubling from ``start``, then bisecting to ``granularity``."""
    import torch

    tried: list[tuple[int, str, float]] = []
    last: tuple[int, float] | None = None  # (tokens, seconds) of the last step that fitted

    def fits(seq: int) -> bool | None:
        nonlocal last
        if last is not None and last[1] * (seq / last[0]) ** 1.5 > budget.left():
            return None  # the predicted time of this try (attention makes it super-linear) is not left
        try:
            if smoke and seq > SMOKE_CAP_TOKENS:
                raise torch.OutOfMemoryError(f"simulated cap of {SMOKE_CAP_TOKENS} tokens (--smoke)")
            seconds, _, _ = one_step(side, _batch(config.vocab_size, seq, device), device)
        except torch.OutOfMemoryError:
            seconds = None
        # released outside the except block: the exception's frames hold the failed step's tensors until then
        side["model"].zero_grad(set_to_none=True)
        _release_memory()
        if seconds is None:
            tried.append((seq, "oom", 0.0))
            return False
        last = (seq, seconds)
        tried.append((seq, "fits", seconds))
        return True

    good, bad = 0, None
    seq = start
    while True:
        ok = fits(seq)
        if ok is None:
            break
        if not ok:
            bad = seq
            break
        good, seq = seq, seq * 2
        if seq > config.max_position_embeddings:
            break
    if good == 0 and bad is not None:  # even the first size failed: halve down to the granularity
        seq = bad // 2
        while seq >= granularity and good == 0:
            ok = fits(seq)
            if ok is None:
                break
            if ok:
                good = seq
            else:
                bad, seq = seq, seq // 2
    while bad is not None and bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity
        if mid <= good:
            break
        ok = fits(mid)
        if ok is None:
            break
        good, bad = (mid, bad) if ok else (good, mid)
    return {"longest_tokens": good, "first_failure": bad, "tries": tried,
            "resolution": granularity if bad is not None and bad - good <= granularity else None}


# ----------------------------------------------------------------------------------------- driver
def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ratio_table(step_rows, context_rows) -> list[dict[str, Any]]:
    out = []
    by = {(r["side"], r["tokens"]): r for r in step_rows if "median_s" in r}
    for (side, tokens), row in sorted(by.items()):
        if side == "peftlab" or ("peftlab", tokens) not in by:
            continue
        ours = by[("peftlab", tokens)]
        out.append({"metric": f"step tokens/s @ {tokens}", "vs": side,
                    "ratio": ours["tokens_per_s"] / row["tokens_per_s"],
                    "same_loss": row.get("same_loss")})
        if row["step_peak_mb"]:
            out.append({"metric": f"step peak memory @ {tokens}", "vs": side,
                        "ratio": ours["step_peak_mb"] / row["step_peak_mb"]})
    ctx = {r["side"]: r for r in context_rows if r.get("longest_tokens")}
    for side, row in ctx.items():
        if side != "peftlab" and "peftlab" in ctx:
            out.append({"metric": f"longest context under {CAP_GIB:g} GiB", "vs": side,
                        "ratio": ctx["peftlab"]["longest_tokens"] / row["longest_tokens"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, simulated memory cap (the suite)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check")
    ap.add_argument("--seqs", default=None, help="comma-separated step lengths (default 2048,8192; smoke 32,64)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--parity-budget-s", type=float, default=150.0, help="most of the budget the parity stage gets")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: parity,dequant,step,context")
    ap.add_argument("--parity", default=None, help="'all' or comma-separated checks (default: all; smoke: "
                    + ", ".join(SMOKE_PARITY) + ")")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    _import_peftlab()
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from common import append_jsonl, environment, print_table

    budget = Budget(args.budget_s)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --smoke on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    skip = set(filter(None, args.skip.split(",")))
    seqs = [int(s) for s in (args.seqs or ("32,64" if args.smoke else "2048,8192")).split(",")]
    iters = 1 if args.smoke else args.iters
    run = {"smoke": args.smoke, "device_kind": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
           "budget_s": args.budget_s, **environment()}
    records: list[dict[str, Any]] = []

    def emit(rows: list[dict[str, Any]]) -> None:  # appended as each stage ends: a hard stop keeps what finished
        for r in rows:
            append_jsonl("gpu_check", {**run, **r}, results_dir=args.results_dir)
        records.extend(rows)

    print(f"== 1. parity of every Triton kernel vs its reference on {device}")
    only = (SMOKE_PARITY if args.smoke else None) if args.parity is None else (
        None if args.parity == "all" else tuple(args.parity.split(",")))
    # parity may not eat the step and context stages: it gets --parity-budget-s of the whole budget at most
    parity_budget = Budget(min(args.parity_budget_s, budget.left()))
    parity_rows = [] if "parity" in skip else parity(device, args.smoke, parity_budget, only)
    print_table(parity_rows, ["check", "dtype", "tensors", "max_abs_err", "status", "seconds"])
    emit([{"stage": "parity", **r} for r in parity_rows])

    if "dequant" not in skip:
        dq = dequant_speed(device, args.smoke)
        print(f"== dequant of a {dq['shape']} NF4 weight: Triton {dq['triton_ms']:.3f} ms, bitsandbytes "
              f"{dq['bitsandbytes_ms']:.3f} ms (the block Functions use Triton on CUDA)")
        emit([{"stage": "dequant", **dq}])

    config = llama_config(args.smoke)
    step_rows: list[dict[str, Any]] = []
    context_rows: list[dict[str, Any]] = []
    sides: dict[str, Any] = {}
    if "step" not in skip or "context" not in skip:
        print(f"== 2. QLoRA step, {config.num_hidden_layers} layers, hidden {config.hidden_size}, r={LORA_R}")
        sides["peftlab"] = peftlab_side(config, device, args.smoke)
        if sides["peftlab"]["fallbacks"]:
            print(f"   per-module fallbacks: {sides['peftlab']['fallbacks']}")
        if device.type == "cuda":  # do the whole-block Functions pay off against peftlab's per-module layers?
            sides["peftlab-per-module"] = peftlab_side(config, device, args.smoke, fused_blocks=False)
        sides["peft"] = peft_side(config, device)
        if sides["peft"]["lora_names"] != sides["peftlab"]["lora_names"]:
            raise SystemExit("gpu_check: peftlab and PEFT wrap different modules; the comparison would be unfair")
        if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
            sides["liger"] = peft_side(config, device, liger=True)
        else:
            run["liger"] = "not installed: side skipped"
    if "step" not in skip:
        step_rows = step_comparison(sides, config, seqs, iters, device, budget)
        print_table(step_rows, ["side", "tokens", "median_s", "tokens_per_s", "step_peak_mb", "loss", "same_loss"])
        emit(step_rows)
    if "context" not in skip:
        cap = f"{CAP_GIB:g} GiB cap" if not args.smoke else f"SIMULATED cap of {SMOKE_CAP_TOKENS} tokens"
        print(f"== 3. longest context under a {cap}, one side on the device at a time")
        # peers first (they stop early: HF's full logits), peftlab last with whatever the budget has left;
        # the per-module side is skipped (its context is peftlab's without the blocks)
        names = [n for n in sides if n not in ("peftlab", "peftlab-per-module")] + ["peftlab"]
        for name in names:
            if budget.left() < 10:
                row = {"stage": "context", "side": name, "status": "skipped: time"}
                context_rows.append(row)
                emit([row])
                continue
            for other in [n for n in list(sides) if n != name]:  # only this side's model stays resident
                sides.pop(other)
            _release_memory()
            if name not in sides:
                sides[name] = (peftlab_side(config, device, args.smoke) if name == "peftlab"
                               else peft_side(config, device, liger=name == "liger"))
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(
                    min(1.0, CAP_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory))
            start, gran = (32, 32) if args.smoke else (4096, 4096)
            # a peer gets 90 s at most (it fails early); peftlab, last, everything that is left
            side_budget = budget if name == "peftlab" else Budget(min(90.0, budget.left() / 2))
            res = longest_context(sides[name], config, device, side_budget, args.smoke, start, gran)
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0)
            row = {"stage": "context", "side": name, "simulated": args.smoke, **res}
            context_rows.append(row)
            emit([row])
            print(f"   {name}: longest {res['longest_tokens']} tokens (first failure {res['first_failure']}), "
                  f"tries {[(s, o) for s, o, _ in res['tries']]}")
    ratios = ratio_table(step_rows, context_rows)
    print("== ratios (peftlab / peer; tokens/s: > 1 is faster, memory: < 1 is smaller)")
    print_table(ratios, ["metric", "vs", "ratio", "same_loss"])
    emit([{"stage": "ratio", **r} for r in ratios])
    bad = [r for r in parity_rows if r["status"] not in ("ok", "absent")]
    bad += [r for r in step_rows if r.get("same_loss") is False]
    print(f"gpu_check: {'FAILED: ' + str(len(bad)) + ' problems' if bad else 'ok'}; {budget.left():.0f} s of the "
          "budget left")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
