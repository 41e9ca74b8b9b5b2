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
from common import measure_op, run_op_bench
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
        rows.append(measure_op("bench_swiglu", args, step, iters, method, {
            "tokens": n, "intermediate": width, "dtype": str(dtype).removeprefix("torch.")}, max_diff))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    return run_op_bench(__doc__, _one_shape, smoke_shape=(16, 40), shapes_cpu=SHAPES_CPU, shapes_gpu=SHAPES_GPU,
                        columns=["tokens", "intermediate", "dtype", "method", "backend", "fwd_bwd_ms", "peak_MiB",
                       "max_abs_diff"], argv=argv)


if __name__ == "__main__":
    main()
