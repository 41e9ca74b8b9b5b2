"""Benchmark: RMSNorm forward + backward, peftlab vs transformers' modules (and Liger's kernel where it installs).

    python bench/bench_rms_norm.py            # CPU: peftlab's PyTorch path vs LlamaRMSNorm / Gemma2RMSNorm
    python bench/bench_rms_norm.py --gpu      # GPU: the Triton kernels vs transformers (vs Liger), bf16
    python bench/bench_rms_norm.py --smoke    # tiny sizes, one iteration (the test suite runs this)

The weight is frozen, as in a LoRA/QLoRA run (no weight gradient). Every row also reports the largest
difference of y and dx against the transformers module on the same inputs. On the GPU ``peak_MiB`` is the
peak of allocated memory above the inputs during forward + backward (what the op keeps for backward
shows there). Results are printed and appended to bench/results/bench_rms_norm.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measure_op, run_op_bench
from peftlab.kernels import rms_norm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

SHAPES_GPU = [(4096, 4096), (16384, 4096), (8192, 8192)]  # (tokens, hidden)
SHAPES_CPU = [(512, 2048)]


def _liger(offset: float):
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except ImportError:
        return None
    return lambda d, eps: LigerRMSNorm(d, eps=eps, offset=offset, casting_mode="gemma" if offset else "llama",
                                       init_fn="zeros" if offset else "ones")


def _one_shape(args: argparse.Namespace, device: str, dtype: torch.dtype, iters: int, n: int, d: int) -> list[dict]:
    rows = []
    for family, cls, offset, eps in (("llama", LlamaRMSNorm, 0.0, 1e-5), ("gemma2", Gemma2RMSNorm, 1.0, 1e-6)):
        hf = cls(d, eps=eps).to(device=device, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            hf.weight.normal_(1.0 - offset, 0.2)
        x = torch.randn(n, d, device=device, dtype=dtype)
        dy = torch.randn(n, d, device=device, dtype=dtype)
        methods = {"transformers": hf,
                   "peftlab": lambda t, w=hf.weight, e=eps, o=offset: rms_norm(t, w, e, offset=o)}
        make_liger = _liger(offset) if args.gpu else None
        if make_liger is not None:
            try:  # its constructor's keywords changed across releases: skip it rather than fail the run
                liger = make_liger(d, eps).to(device=device, dtype=dtype).requires_grad_(False)
                liger.weight.data.copy_(hf.weight)
                methods["liger"] = liger
            except (TypeError, ValueError) as exc:
                print(f"liger skipped: {exc}")
        xr = x.clone().requires_grad_(True)
        y_ref = hf(xr)
        y_ref.backward(dy)
        for method, fn in methods.items():
            def step(fn=fn, x=x, dy=dy):
                xi = x.clone().requires_grad_(True)
                out = fn(xi)
                out.backward(dy)
                return out, xi.grad

            y, dx = step()
            max_diff = max(float((y.detach().float() - y_ref.detach().float()).abs().max()),
                           float((dx.float() - xr.grad.float()).abs().max()))
            rows.append(measure_op("bench_rms_norm", args, step, iters, method, {
                "tokens": n, "hidden": d, "norm": family, "dtype": str(dtype).removeprefix("torch.")}, max_diff))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    return run_op_bench(__doc__, _one_shape, smoke_shape=(64, 96), shapes_cpu=SHAPES_CPU, shapes_gpu=SHAPES_GPU,
                        columns=["tokens", "hidden", "norm", "dtype", "method", "backend", "fwd_bwd_ms", "peak_MiB",
                       "max_abs_diff"], argv=argv)


if __name__ == "__main__":
    main()
