"""Benchmark: SwiGLU ``silu(gate) · up`` forward + backward, peftlab vs transformers' MLP activation.

    python bench/bench_swiglu.py            # CPU: peftlab's PyTorch path vs act_fn(gate) * up
    python bench/bench_swiglu.py --gpu      # GPU: the Triton kernels (backward in place) vs transformers, bf16
    python bench/bench_swiglu.py --smoke    # tiny sizes, one iteration (the test suite runs this)

gate and up are fresh non-leaf activations each step (as gate_proj / up_proj outputs are); the same
preamble for every method. ``max_abs_diff``: largest difference of h, dgate and dup against transformers on
the same inputs. On the GPU ``peak_MiB`` is the peak allocated above the inputs during forward + backward:
the in-place backward allocates no gradient buffers of the MLP's width. Results go to
bench/results/bench_swiglu.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, median_time_ms, run_op_bench
from peftlab.kernels import swiglu
from transformers.activations import ACT2FN

SHAPES_GPU = [(2048, 14336), (8192, 14336), (4096, 18944)]  # (tokens, intermediate): Llama-3-8B, Qwen2-7B
SHAPES_CPU = [(512, 2816)]


def _liger():
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return LigerSiLUMulFunction.apply


def _one_shape(args: argparse.Namespace, device: str, dtype: torch.dtype, iters: int, n: int, width: int) -> list[dict]:
    rows = []
    gate0 = torch.randn(n, width, device=device, dtype=dtype, requires_grad=True)
    up0 = torch.randn(n, width, device=device, dtype=dtype, requires_grad=True)
    dh = torch.randn(n, width, device=device, dtype=dtype)
    methods = {"transformers": lambda g, u: ACT2FN["silu"](g) * u, "peftlab": swiglu}
    liger = _liger() if args.gpu else None
    if liger is not None:
        methods["liger"] = liger
    ref = None
    for method, fn in methods.items():
        def step(fn=fn):
            gate0.grad = up0.grad = None
            h = fn(gate0 * 1, up0 * 1)
            h.backward(dh)
            return h.detach(), gate0.grad, up0.grad

        out = step()
        ref = ref or out
        max_diff = max(float((a.float() - r.float()).abs().max()) for a, r in zip(out, ref, strict=True))
        peak = None
        if args.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = median_time_ms(step, warmup=0 if args.smoke else 2, iters=iters)
        row = {"tokens": n, "intermediate": width, "dtype": str(dtype).removeprefix("torch."), "method": method,
               "backend": "triton" if (args.gpu and method == "peftlab") else "torch", "fwd_bwd_ms": ms,
               "peak_MiB": peak, "max_abs_diff": max_diff}
        rows.append(row)
        append_jsonl("bench_swiglu", row, results_dir=args.results_dir)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    return run_op_bench(__doc__, _one_shape, smoke_shape=(16, 40), shapes_cpu=SHAPES_CPU, shapes_gpu=SHAPES_GPU,
                        columns=["tokens", "intermediate", "dtype", "method", "backend", "fwd_bwd_ms", "peak_MiB",
                       "max_abs_diff"], argv=argv)

if __name__ == "__main__":
    main()
