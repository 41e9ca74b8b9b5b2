#!/usr/bin/env python3
"""One prepared GPU check (issue 18): kernel parity on the device, the 8B QLoRA step vs HF PEFT, 24 GB context.

Run it through ``bench/gpu_check.sh`` on a lent GPU (≤ 8 minutes, ``--budget-s``); ``--smoke`` runs every stage
on the CPU in seconds (tiny model, Triton under the interpreter, a SIMULATED memory cap) and is what the suite
runs (tests/bench/test_gpu_check_smoke.py). Stages, each skipped with a note when the budget is spent:

1. **parity** — every Triton kernel against its PyTorch reference on the device, fp32 and bf16, odd shapes,
   forward and input gradients, at the tolerances of tests/kernels (fp32 atol 1e-5 / rtol 5e-4; bf16 against
   the fp32 reference of the same bf16 inputs, atol 5e-3 / rtol 5e-2, or normwise within a few bf16 roundings,
   "ok (normwise)": see :data:`BF16_NORMWISE`; NF4 dequant bit for bit). Kernels of modules not in this checkout
   are listed as absent.
   **dequant** — Triton vs bitsandbytes NF4 dequant of the 8B MLP weight (which the block Functions should use).
2. **step** — the Llama-3.1-8B architecture (numbers below; all 32 layers), random init made on the GPU and
   quantised as it is made (NF4, double quant, bf16 compute; ``peftlab.model.quantized_load.random_quantized``,
   seed 0) ONCE: every side is a deep copy of the module tree over the same frozen weight tensors. LoRA r=16 /
   alpha 32 on all linear layers with the same (non-zero) LoRA weights, non-reentrant gradient checkpointing,
   one sequence of 2k and of 8k tokens:
   **peftlab** (``train.fused_blocks`` and ``train.fused_norm``, kernels auto, fused linear cross-entropy),
   **peftlab-per-module**
   (the same with ``fused_blocks: false``: what the blocks themselves gain) vs **peft** (HF PEFT on
   transformers' model with bitsandbytes Linear4bit, ``model(labels=...)``) and **liger** (the peft side with
   Liger's kernels, only when ``liger_kernel`` imports). Forward + backward, alternating sides, one warm-up;
   medians; step peak memory = ``max_memory_allocated`` above the model; the losses must agree (relative 1e-3).
3. **context** — per side alone on the device under a 24 GiB cap
   (``torch.cuda.set_per_process_memory_fraction``), the longest single sequence whose step fits: doubling (peers
   from 4k, to 1k tokens; peftlab from 32k, to 4k tokens, up to the model's 131072 positions), then bisecting,
   while the budget lasts. peftlab's side adds ``train.offload_activations`` and ``train.mlp_chunk_tokens: 4096``
   (what the figure is for); if that side breaks or fits nothing, "peftlab (no offload)" gets the rest.

A side, stage or try that fails is a result row (``status``/``error``, the traceback in the log); the others
still run, and the table is printed even after the hard stop (SIGINT); the exit code is 1 when anything failed.

Prints one table of ratios (peftlab over each peer) and appends JSON lines to bench/results/gpu_check.jsonl
(``--results-dir``). Never reports a figure it did not measure: skipped stages say so.

    bash bench/gpu_check.sh                       # on a GPU
    python -P bench/gpu_check.py --smoke          # CPU, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
import traceback
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
# bf16 at these shapes (reductions over 1000-32003 terms; tests/kernels use 8-100) carries a few bf16 roundings that
# land differently on the two sides: the GPU's dequant + cuBLAS path rounds x·Wᵀ to bf16 before adding the LoRA term,
# the reference after, and matmul_f32 rounds the rank-sized fp32 operand to bf16 for the tensor cores. Where a sum
# of ±20-sized terms is near zero, that is 0.06 off against atol 5e-3: elementwise allclose fails on correct kernels.
# Measured on the CPU with the GPU path forced (fused_lora_linear / lora_gated_mlp, 333 x 1000 x 1544, bf16):
# relative L2 error 2.9e-3, relative max error <= 6.4e-3, 143-17k elements outside allclose. A bf16 check therefore
# passes elementwise or normwise within a few bf16 roundings ("ok (normwise)"); a real bug (a wrong nibble, scale or
# row, a missing LoRA term) is 10-100x above these bounds, and fp32 stays elementwise at the tests' tolerances.
BF16_NORMWISE = {"rel_l2": 1e-2, "rel_max": 2e-2}


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
            rows.append({"check": name, "dtype": name_dt, **compare(fused, ref, bitwise, name_dt),
                         "seconds": round(time.perf_counter() - t0, 2)})
    return rows


def compare(fused, ref, bitwise: bool, dtype_name: str) -> dict[str, Any]:
    """tensors, max_abs_err, rel_l2_err (worst over the tensors), elementwise (allclose at the tests' tolerances, or
    bitwise) and status: "ok", "ok (normwise)" (bf16 within :data:`BF16_NORMWISE`, see there) or "MISMATCH"."""
    import torch

    worst = rel_l2 = rel_max = 0.0
    elementwise = len(fused) == len(ref)
    for a, b in zip(fused, ref):
        a, b = a.float(), b.float()
        if a.shape != b.shape:
            elementwise, rel_l2, rel_max = False, math.inf, math.inf
            continue
        if not a.numel():
            continue
        err = (a - b).abs()
        worst = max(worst, float(err.max()))
        scale = float(b.abs().max())
        rel_max = max(rel_max, float(err.max()) / scale if scale else (0.0 if float(err.max()) == 0 else math.inf))
        norm = float(b.norm())
        rel_l2 = max(rel_l2, float((a - b).norm()) / norm if norm else (0.0 if float(err.max()) == 0 else math.inf))
        elementwise &= torch.equal(a, b) if bitwise else bool(torch.allclose(a, b, **TOL[dtype_name]))
    status = "ok" if elementwise else "MISMATCH"
    if (not elementwise and not bitwise and dtype_name == "bfloat16" and len(fused) == len(ref)
            and rel_l2 <= BF16_NORMWISE["rel_l2"] and rel_max <= BF16_NORMWISE["rel_max"]):
        status = "ok (normwise)"
    return {"tensors": len(fused), "max_abs_err": worst, "rel_l2_err": rel_l2, "elementwise": elementwise,
            "status": status}


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
    # quantised from a weight in the compute dtype, as the model's are: quant_state.dtype is bf16, so bitsandbytes'
    # kernel writes bf16 itself (from fp32 data it would write fp32 and need a cast kernel: twice the bytes)
    w = bnb.nn.Params4bit((torch.randn(shape) * 0.02).to(dtype), requires_grad=False, compress_statistics=True,
                          quant_type="nf4").to(device)
    assert w.quant_state.dtype == dtype, w.quant_state.dtype
    ours = median_time_ms(lambda: nf4_dequantize(w, w.quant_state, out_dtype=dtype, backend="triton"),
                          iters=3 if smoke else 20)
    theirs = median_time_ms(lambda: bnbF.dequantize_4bit(w.data, w.quant_state), iters=3 if smoke else 20)
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


# train.mlp_chunk_tokens of the long-context side: what `peftlab estimate` advises for long sequences
# (peftlab.engine.memory_fit); --smoke chunks its 32-224-token tries too
MLP_CHUNK_TOKENS, SMOKE_MLP_CHUNK_TOKENS = 4096, 48


def peftlab_side(config, device, smoke: bool, fused_blocks: bool = True, long_context: bool = False):
    """peftlab's model as ``build_model`` makes it from a recipe with ``train.fused_norm`` and ``train.fused_blocks``
    (the per-module side: ``fused_blocks=False``); ``long_context``: also ``train.offload_activations`` and
    ``train.mlp_chunk_tokens``, the keys the longest-context figure is for (the step sides run without them)."""
    from peftlab.adapters.fused_blocks import apply_fused_blocks
    from peftlab.adapters.lora_inject import lora_modules
    from peftlab.model.fused_norm import apply_fused_norm
    from peftlab.model.load import attach_adapters, enable_gradient_checkpointing
    from peftlab.model.long_context import apply_activation_offload, apply_mlp_chunking
    from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss, count_targets
    from peftlab.recipe.parse import recipe_from_dict

    model = base_model(config, device)
    train = {"device": device.type, "fused_blocks": fused_blocks, "fused_norm": True}
    if long_context:
        train.update(offload_activations=True, mlp_chunk_tokens=SMOKE_MLP_CHUNK_TOKENS if smoke else MLP_CHUNK_TOKENS)
    recipe = recipe_from_dict({
        "model": {"name": "unused", "gradient_checkpointing": True},
        "quantization": {"mode": "nf4", "double_quant": True},
        "adapter": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0},
        "data": {"train": ["unused.jsonl"]},
        "train": train,
        "kernels": "torch" if smoke else "auto",  # smoke: bitsandbytes' dequant (the interpreter is slow)
    })
    # the calls and their order of peftlab.model.load.build_model
    apply_fused_norm(model, backend=recipe.kernels)  # per instance: the norm weights stay the shared Parameters
    attach_adapters(model, recipe, device)
    fallbacks = apply_fused_blocks(model) if fused_blocks else {}
    enable_gradient_checkpointing(model)
    if long_context:
        apply_activation_offload(model)
        apply_mlp_chunking(model, recipe.train.mlp_chunk_tokens)
    lora = {n: (m.lora_A.weight, m.lora_B.weight) for n, m in lora_modules(model).items()}
    set_lora_values(lora)
    model.train()
    settings = LossSettings(backend="auto")

    def step(batch) -> float:
        loss = causal_lm_loss(model, batch, normalizer=count_targets(batch), settings=settings)
        loss.backward()
        return float(loss.detach())

    return {"model": model, "step": step, "fallbacks": fallbacks, "lora_names": sorted(lora)}


_MISSING = object()


def take_back_module_patches(module, apply: Callable[[], Any]) -> dict[str, Any]:
    """Run ``apply`` and undo what it set on ``module`` at once; returns those attributes (for :func:`module_patched`).

    Liger's instance patch also rebinds module-level names of transformers' modeling file for every model
    (``modeling_llama.apply_rotary_pos_emb = liger_rotary_pos_emb``, ``LlamaRMSNorm``, ``LlamaMLP``): left in place,
    the HF PEFT and peftlab per-module sides would run Liger's RoPE from then on, and the baseline would not be HF's.
    """
    before = dict(vars(module))
    apply()
    patched = {k: v for k, v in vars(module).items() if before.get(k, _MISSING) is not v}
    for k in patched:
        if k in before:
            setattr(module, k, before[k])
        else:
            delattr(module, k)
    return patched


@contextlib.contextmanager
def module_patched(module, attrs: dict[str, Any]):
    """``attrs`` set on ``module`` inside the block (the Liger side's step), the module's own values after it."""
    before = {k: vars(module).get(k, _MISSING) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is _MISSING:
                delattr(module, k)
            else:
                setattr(module, k, v)


def peft_side(config, device, liger: bool = False):
    from peft import LoraConfig, get_peft_model
    from torch import nn

    model = base_model(config, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    modeling, patched = sys.modules[type(model).__module__], {}
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        patched = take_back_module_patches(modeling, lambda: _apply_liger_kernel_to_instance(model=model))
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear"))
    # the same LoRA values as peftlab's side: module names match once PEFT's prefix and adapter name are dropped
    lora = {name.removeprefix("base_model.model."): (m.lora_A["default"].weight, m.lora_B["default"].weight)
            for name, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and "default" in m.lora_A}
    set_lora_values(lora)
    model.train()

    def step(batch) -> float:
        with module_patched(modeling, patched):  # Liger's module-level kernels for this side's step (and recompute)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            out.loss.backward()
        return float(out.loss.detach())

    return {"model": model, "step": step, "fallbacks": {}, "lora_names": sorted(lora), "liger_patched": sorted(patched)}


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
    """(seconds, loss, step peak bytes above what was allocated before) of one forward + backward.

    The block Functions' shared dequant buffer is dropped first: allocated inside the step, it counts in the step's
    peak as bitsandbytes' per-call dequant temporaries count in the peers' (kept from the previous step, it would
    count as model memory)."""
    import torch
    from peftlab.kernels.fused_lora_block import BUFFERS

    side["model"].zero_grad(set_to_none=True)
    BUFFERS.clear()
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


def _error(exc: BaseException) -> str:
    """A failure as a result row's status; the traceback goes to the log (stderr) for the fix before the rerun."""
    traceback.print_exc()
    return f"error: {type(exc).__name__}: {exc}"[:400]


def _is_oom(exc: BaseException) -> bool:
    """Out of memory under the cap: the caching allocator's OutOfMemoryError, or the same condition as a RuntimeError
    from a library that allocates outside it (cuBLAS/cuDNN workspaces, pinned host buffers) — the training loop's own
    rule (:func:`peftlab.trainer.failures.out_of_memory_detail`)."""
    from peftlab.trainer.failures import out_of_memory_detail

    return out_of_memory_detail(exc) is not None


def step_comparison(sides, config, seqs, iters, device, budget: Budget) -> list[dict[str, Any]]:
    """Alternating steps of every side at each length. A side whose step raises is reported with the error and left
    out from then on (the others go on: one failing side must not cost the figures of the rest)."""
    rows = []
    failed: dict[str, str] = {}
    for seq in seqs:
        batch = _batch(config.vocab_size, seq, device)
        times = {k: [] for k in sides}
        losses, peaks = {}, {k: 0 for k in sides}
        for it in range(iters + 1):  # round 0 is the warm-up (Triton compiles, cuBLAS heuristics)
            if it > 1 and budget.left() < 0:
                break
            for name, side in sides.items():  # alternating A/B/C, A/B/C...
                if name in failed:
                    continue
                try:
                    seconds, losses[name], peak = one_step(side, batch, device)
                except Exception as exc:  # noqa: BLE001 - this side's result is its error
                    failed[name] = f"{_error(exc)} (at {seq} tokens)"
                    side["model"].zero_grad(set_to_none=True)
                    _release_memory()
                    continue
                peaks[name] = max(peaks[name], peak)
                if it:
                    times[name].append(seconds)
        for name in sides:
            if name in failed:
                rows.append({"stage": "step", "side": name, "tokens": seq, "status": failed[name]})
                continue
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
    """Longest single-sequence step that fits: doubling from ``start`` (the last try clamped to the model's
    ``max_position_embeddings``), then bisecting to ``granularity``. Out of memory is a result ("oom"); any other
    failure ends the search with ``error`` set (what fitted before it is kept)."""
    import torch

    from peftlab.model.long_context import release_host_buffers

    tried: list[tuple[int, str, float]] = []
    last: tuple[int, float] | None = None  # (tokens, seconds) of the last step that fitted
    limit = int(config.max_position_embeddings)
    error: str | None = None
    first_oom: str | None = None  # the first out-of-memory message: the device's allocator, or a host (pinned) buffer?
    interrupted = False

    def fits(seq: int) -> bool | None:
        nonlocal last, error, interrupted, first_oom
        if interrupted:
            return None
        if last is not None and last[1] * (seq / last[0]) ** 1.5 > budget.left():
            return None  # the predicted time of this try (attention makes it super-linear) is not left
        if seq > max((s for s, _, _ in tried), default=0):
            # longer than any try so far: the offloaded inputs need larger pinned buffers; the smaller ones the host
            # allocator would keep cached (it never frees them on its own) go back to the OS first
            release_host_buffers(side["model"])
        seconds = None
        try:
            if smoke and seq > SMOKE_CAP_TOKENS:
                raise torch.OutOfMemoryError(f"simulated cap of {SMOKE_CAP_TOKENS} tokens (--smoke)")
            seconds, _, _ = one_step(side, _batch(config.vocab_size, seq, device), device)
        except KeyboardInterrupt:  # the hard stop: what fitted so far is still reported (the caller re-raises)
            interrupted = True
        except Exception as exc:  # noqa: BLE001 - out of memory is this try's answer; anything else ends the search
            if not _is_oom(exc):
                error = f"{_error(exc)} (at {seq} tokens)"
            elif first_oom is None:
                first_oom = f"{type(exc).__name__} at {seq} tokens: {exc}"[:300]
        # released outside the except block: the exception's frames hold the failed step's tensors until then
        side["model"].zero_grad(set_to_none=True)
        _release_memory()
        if error is not None or interrupted:
            tried.append((seq, "error" if error is not None else "interrupted", 0.0))
            return None
        if seconds is None:
            tried.append((seq, "oom", 0.0))
            return False
        last = (seq, seconds)
        tried.append((seq, "fits", seconds))
        return True

    good, bad = 0, None
    seq = min(start, limit)
    while True:
        ok = fits(seq)
        if ok is None:
            break
        if not ok:
            bad = seq
            break
        good = seq
        if seq >= limit:
            break
        seq = min(seq * 2, limit)
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
    while error is None and bad is not None and bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity
        if mid <= good:
            break
        ok = fits(mid)
        if ok is None:
            break
        good, bad = (mid, bad) if ok else (good, mid)
    release_host_buffers(side["model"])
    return {"longest_tokens": good, "first_failure": bad, "tries": tried, "error": error, "interrupted": interrupted,
            "first_oom": first_oom,
            "resolution": granularity if bad is not None and bad - good <= granularity else None}


# ----------------------------------------------------------------------------------------- driver
def _release_memory() -> None:
    """Free what a finished side or a failed try left: Python garbage, the block Functions' shared dequant buffer
    (one 16-bit copy of the largest weight, 117 MB at 8B: the next side under the cap must not pay for it), the
    caching allocator's idle blocks."""
    import torch
    from peftlab.kernels.fused_lora_block import BUFFERS

    BUFFERS.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def ratio_table(step_rows, context_rows) -> list[dict[str, Any]]:
    """peftlab's variants over each peer (and the blocks over the per-module side): tokens/s and step peak memory
    at each length, longest context. Only measured rows enter: a failed or skipped side has no ratio."""
    out = []
    by = {(r["side"], r["tokens"]): r for r in step_rows if "median_s" in r}
    ours_names = ("peftlab", "peftlab-per-module")
    for ours_name in ours_names:
        for (side, tokens), row in sorted(by.items()):
            if side == ours_name or (ours_name, tokens) not in by or (side in ours_names and ours_name != "peftlab"):
                continue
            ours = by[(ours_name, tokens)]
            vs = side if ours_name == "peftlab" else f"{side} ({ours_name})"
            out.append({"metric": f"step tokens/s @ {tokens}", "vs": vs,
                        "ratio": ours["tokens_per_s"] / row["tokens_per_s"], "same_loss": row.get("same_loss")})
            if row["step_peak_mb"]:
                out.append({"metric": f"step peak memory @ {tokens}", "vs": vs,
                            "ratio": ours["step_peak_mb"] / row["step_peak_mb"]})
    ctx = {r["side"]: r for r in context_rows if r.get("longest_tokens")}
    ours_ctx = [n for n in ctx if n.startswith("peftlab")]
    for name in ours_ctx:
        for side, row in ctx.items():
            if not side.startswith("peftlab"):
                out.append({"metric": f"longest context under {CAP_GIB:g} GiB", "vs": side if name == "peftlab"
                            else f"{side} ({name})", "ratio": ctx[name]["longest_tokens"] / row["longest_tokens"]})
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

    parity_rows: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    context_rows: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []  # build and context failures (parity and step rows carry their own)
    sides: dict[str, Any] = {}

    def build(name: str, make: Callable[[], dict[str, Any]]) -> bool:
        """Build one side; a failure is recorded and the check goes on without that side."""
        try:
            sides[name] = make()
            return True
        except Exception as exc:  # noqa: BLE001 - a side that cannot be built is a result, not the end of the check
            row = {"stage": "build", "side": name, "status": _error(exc)}
            print(f"   {name}: could not be built: {row['status']}")
            problems.append(row)
            emit([row])
            _release_memory()
            return False

    interrupted = False
    try:  # the hard stop (timeout's SIGINT) ends the stages, not the table of what finished
        print(f"== 1. parity of every Triton kernel vs its reference on {device}")
        only = (SMOKE_PARITY if args.smoke else None) if args.parity is None else (
            None if args.parity == "all" else tuple(args.parity.split(",")))
        # parity may not eat the step and context stages: it gets --parity-budget-s of the whole budget at most
        parity_budget = Budget(min(args.parity_budget_s, budget.left()))
        parity_rows = [] if "parity" in skip else parity(device, args.smoke, parity_budget, only)
        print_table(parity_rows, ["check", "dtype", "tensors", "max_abs_err", "rel_l2_err", "status", "seconds"])
        emit([{"stage": "parity", **r} for r in parity_rows])

        if "dequant" not in skip:
            try:
                dq = dequant_speed(device, args.smoke)
                print(f"== dequant of a {dq['shape']} NF4 weight: Triton {dq['triton_ms']:.3f} ms, bitsandbytes "
                      f"{dq['bitsandbytes_ms']:.3f} ms (the block Functions use Triton on CUDA)")
            except Exception as exc:  # noqa: BLE001
                dq = {"status": _error(exc)}
                problems.append({"stage": "dequant", **dq})
                print(f"== dequant: {dq['status']}")
            emit([{"stage": "dequant", **dq}])
            _release_memory()

        config = llama_config(args.smoke)
        if "step" not in skip or "context" not in skip:
            print(f"== 2. QLoRA step, {config.num_hidden_layers} layers, hidden {config.hidden_size}, r={LORA_R}")
            if build("peftlab", lambda: peftlab_side(config, device, args.smoke)) and sides["peftlab"]["fallbacks"]:
                print(f"   per-module fallbacks: {sides['peftlab']['fallbacks']}")
            if device.type == "cuda":  # do the whole-block Functions pay off against peftlab's per-module layers?
                build("peftlab-per-module", lambda: peftlab_side(config, device, args.smoke, fused_blocks=False))
            build("peft", lambda: peft_side(config, device))
            if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
                build("liger", lambda: peft_side(config, device, liger=True))
            else:
                run["liger"] = "not installed: side skipped"
            ours = sides.get("peftlab") or sides.get("peftlab-per-module")
            for peer in [n for n in sides if not n.startswith("peftlab")]:
                if ours is not None and sides[peer]["lora_names"] != ours["lora_names"]:
                    row = {"stage": "build", "side": peer, "status": "error: peftlab and this side wrap different "
                           "modules; the comparison would be unfair (side dropped)"}
                    problems.append(row)
                    emit([row])
                    sides.pop(peer)
        if "step" not in skip and sides:
            step_rows = step_comparison(sides, config, seqs, iters, device, budget)
            print_table(step_rows, ["side", "tokens", "median_s", "tokens_per_s", "step_peak_mb", "loss", "same_loss",
                                    "status"])
            emit(step_rows)
        if "context" not in skip:
            context_rows = context_stage(sides, config, device, budget, args.smoke, emit, problems)
    except KeyboardInterrupt:
        interrupted = True
        print("gpu_check: interrupted (the hard stop?): the table below has what finished before", file=sys.stderr)
    ratios = ratio_table(step_rows, context_rows)
    print("== ratios (peftlab / peer; tokens/s: > 1 is faster, memory: < 1 is smaller)")
    print_table(ratios, ["metric", "vs", "ratio", "same_loss"])
    emit([{"stage": "ratio", **r} for r in ratios])
    bad = [r for r in parity_rows if r["status"] not in ("ok", "ok (normwise)", "absent")]
    bad += [r for r in step_rows if r.get("same_loss") is False or str(r.get("status", "")).startswith("error")]
    bad += problems
    print(f"gpu_check: {'FAILED: ' + str(len(bad)) + ' problems' if bad else 'ok'}"
          f"{' (interrupted)' if interrupted else ''}; {budget.left():.0f} s of the budget left")
    return 1 if bad or interrupted else 0


@contextlib.contextmanager
def memory_cap(device, gib: float):
    """The caching allocator of ``device`` limited to ``gib`` GiB inside the block (the whole card after it); nothing
    on the CPU. torch wants a device index here: ``torch.device("cuda")`` (no index) is refused with a ValueError."""
    import torch

    if device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def context_stage(sides, config, device, budget: Budget, smoke: bool, emit, problems) -> list[dict[str, Any]]:
    """Per side alone on the device under the cap: the peers first (HF stops early: its full logits), reusing their
    step-stage models; then peftlab with the long-context keys (offloaded layer inputs, the MLP in chunks) and
    whatever the budget has left. Should that side fail for another reason than memory before fitting anything, the
    rest of the budget goes to peftlab without the long-context keys ("peftlab (no offload)"), so the run still has
    a peftlab figure. The per-module side is left out (its context is peftlab's without the blocks)."""

    rows: list[dict[str, Any]] = []
    cap = f"{CAP_GIB:g} GiB cap" if not smoke else f"SIMULATED cap of {SMOKE_CAP_TOKENS} tokens"
    print(f"== 3. longest context under a {cap}, one side on the device at a time")
    plan: list[tuple[str, Callable[[], dict[str, Any]] | None]] = [
        (n, None) for n in sides if not n.startswith("peftlab")]
    plan.append(("peftlab", lambda: peftlab_side(config, device, smoke, long_context=True)))
    while plan:
        name, make = plan.pop(0)
        if budget.left() < 10:
            row = {"stage": "context", "side": name, "status": "skipped: time"}
            rows.append(row)
            emit([row])
            continue
        for other in [n for n in list(sides) if n != name or make is not None]:  # only this side stays resident
            sides.pop(other)
        _release_memory()
        res: dict[str, Any] | None = None
        if make is not None:
            try:
                sides[name] = make()
            except Exception as exc:  # noqa: BLE001
                res = {"longest_tokens": 0, "first_failure": None, "tries": [], "error": _error(exc),
                       "interrupted": False, "resolution": None}
        if res is None:
            peer = not name.startswith("peftlab")
            # peers: start at 4k with 1k resolution (HF fits ~6k on 24 GB); peftlab from 32k, 4k resolution
            start, gran = (32, 32) if smoke else ((4096, 1024) if peer else (32768, 4096))
            # a peer gets 90 s at most (it fails early); peftlab, last, everything that is left
            side_budget = Budget(min(90.0, budget.left() / 2)) if peer else budget
            with memory_cap(device, CAP_GIB):
                res = longest_context(sides[name], config, device, side_budget, smoke, start, gran)
        row = {"stage": "context", "side": name, "simulated": smoke, **res}
        if res["error"]:
            problems.append({"stage": "context", "side": name, "status": res["error"]})
        if name == "peftlab" and not res["longest_tokens"] and not res.get("interrupted"):
            # broken, or nothing fits (a pinned host buffer the machine refuses reads as out of memory too)
            plan.append(("peftlab (no offload)", lambda: peftlab_side(config, device, smoke)))
        rows.append(row)
        emit([row])
        print(f"   {name}: longest {res['longest_tokens']} tokens (first failure {res['first_failure']}), "
              f"tries {[(s, o) for s, o, _ in res['tries']]}{'; ' + res['error'] if res['error'] else ''}"
              f"{'; first out of memory: ' + res['first_oom'] if res.get('first_oom') else ''}")
        if res.get("interrupted"):
            raise KeyboardInterrupt
    for other in list(sides):
        sides.pop(other)
    _release_memory()
    return rows


if __name__ == "__main__":
    sys.exit(main())
