"""Benchmark: rotary embeddings on q and k, forward + backward, peftlab (in place) vs transformers.

    python bench/bench_rope.py            # CPU: peftlab's PyTorch path vs apply_rotary_pos_emb
    python bench/bench_rope.py --gpu      # GPU: the Triton kernel (in place) vs transformers (vs Liger), bf16
    python bench/bench_rope.py --smoke    # tiny sizes, one iteration (the test suite runs this)

q and k are what attention rotates: transposed views of the q/k projection outputs (B, H, T, D), with
cos/sin from transformers' Llama-3 rotary module. Both methods pay the same preamble (a fresh non-leaf
projection output per step). ``max_abs_diff`` is the largest difference of the rotated q/k and of their
gradients against transformers on the same inputs; on the GPU ``peak_MiB`` is the peak allocated above
the inputs during forward + backward. Results go to bench/results/bench_rope.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measure_op, run_op_bench
from peftlab.kernels import apply_rope_
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

# (batch, tokens, q heads, kv heads, head_dim): Llama-3-8B attention at 2k / 8k tokens, Qwen2-7B at 4k
SHAPES_GPU = [(1, 2048, 32, 8, 128), (1, 8192, 32, 8, 128), (2, 4096, 28, 4, 128)]
SHAPES_CPU = [(1, 512, 16, 4, 64)]


def _liger():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        return None
    return lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)


def _one_shape(args: argparse.Namespace, device: str, dtype: torch.dtype, iters: int, b: int, t: int, hq: int, hk: int, d: int) -> list[dict]:
    rows = []
    cfg = LlamaConfig(hidden_size=hq * d, num_attention_heads=hq, num_key_value_heads=hk,
                      max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    pos = torch.arange(t, device=device)[None].expand(b, t)
    cos, sin = rotary(torch.zeros(1, device=device, dtype=dtype), pos)
    q_proj = torch.randn(b, t, hq * d, device=device, dtype=dtype, requires_grad=True)
    k_proj = torch.randn(b, t, hk * d, device=device, dtype=dtype, requires_grad=True)
    gq = torch.randn(b, hq, t, d, device=device, dtype=dtype)
    gk = torch.randn(b, hk, t, d, device=device, dtype=dtype)

    def views():
        q = (q_proj * 1).view(b, t, hq, d).transpose(1, 2)
        k = (k_proj * 1).view(b, t, hk, d).transpose(1, 2)
        return q, k

    methods = {"transformers": lambda q, k: apply_rotary_pos_emb(q, k, cos, sin),
               "peftlab": lambda q, k: apply_rope_(q, k, cos, sin)}
    liger = _liger() if args.gpu else None
    if liger is not None:
        methods["liger"] = lambda q, k: liger(q, k, cos, sin)
    ref = None
    for method, fn in methods.items():
        def step(fn=fn):
            q_proj.grad = k_proj.grad = None
            q, k = fn(*views())
            torch.autograd.backward((q, k), (gq, gk))
            return q.detach(), k.detach(), q_proj.grad, k_proj.grad

        out = step()
        ref = ref or out
        max_diff = max(float((a.float() - r.float()).abs().max()) for a, r in zip(out, ref, strict=True))
        rows.append(measure_op("bench_rope", args, step, iters, method, {
            "batch": b, "tokens": t, "heads": f"{hq}/{hk}", "head_dim": d,
            "dtype": str(dtype).removeprefix("torch.")}, max_diff))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    return run_op_bench(__doc__, _one_shape, smoke_shape=(1, 16, 4, 2, 16), shapes_cpu=SHAPES_CPU, shapes_gpu=SHAPES_GPU,
                        columns=["batch", "tokens", "heads", "head_dim", "dtype", "method", "backend", "fwd_bwd_ms",
                       "peak_MiB", "max_abs_diff"], argv=argv)


if __name__ == "__main__":
    main()
