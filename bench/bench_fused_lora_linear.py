"""Benchmark: one QLoRA linear layer, forward + backward, peftlab fused vs HF PEFT LoRA on bnb Linear4bit.

    python bench/bench_fused_lora_linear.py            # CPU: the PyTorch reference path (what CPU runs)
    python bench/bench_fused_lora_linear.py --gpu      # GPU: parity PASS/FAIL first, then the sweep
    python bench/bench_fused_lora_linear.py --smoke    # tiny sizes, one iteration (< 20 s)

Layers 4096->4096, 4096->14336, 14336->4096 (Llama-3-8B), r=16, NF4 double quant, bf16. Figures are
printed as a table and appended to bench/results/bench_fused_lora_linear.jsonl with device, versions,
git commit and command. Peak memory: torch.cuda.max_memory_allocated on GPU; peak RSS of a fresh
subprocess on CPU (skipped with --smoke).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, median_time_ms, print_table, run_peak_rss

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def build(in_f: int, out_f: int, r: int, device: str, dtype=torch.bfloat16, seed: int = 0):
    """A bnb Linear4bit (NF4, double quant) base wrapped in PEFT's LoRA layer, plus our A/B views."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype)
    base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=True,
                             quant_type="nf4")
    base.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    base = base.to(device)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, init_lora_weights=False)
    layer = PeftLinear4bit(base, adapter_name="default", config=cfg, r=r, lora_alpha=2 * r, lora_dropout=0.0,
                           init_lora_weights=False).to(device)
    layer.lora_A["default"].to(dtype)
    layer.lora_B["default"].to(dtype)
    layer.train()
    return layer, base, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def step_fn(method: str, layer, base, a, b, x, dy, backend: str):
    from peftlab.kernels.fused_lora_linear import fused_lora_linear

    def run() -> None:
        xi = x.detach().requires_grad_()
        y = layer(xi) if method == "peft" else fused_lora_linear(xi, base, a, b, 2.0, backend=backend)
        torch.autograd.backward(y, dy)
        a.grad = b.grad = None

    return run


def parity_check(device: str) -> bool:
    """Triton vs reference on the device (forward + grads), bf16 tolerances; prints PASS/FAIL."""
    from peftlab.kernels.fused_lora_linear import fused_lora_linear, reference_lora_linear
    from peftlab.kernels.nf4 import nf4_dequantize, reference_nf4_dequantize

    ok = True
    _, base, a, b = build(4096, 1000, 16, device)
    qs = base.weight.quant_state
    exact = torch.equal(nf4_dequantize(base.weight, qs, backend="triton"),
                        reference_nf4_dequantize(base.weight, qs))
    print(f"nf4_dequantize triton == reference (bitwise): {'PASS' if exact else 'FAIL'}")
    ok &= exact
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(333, 4096, device=device, generator=g).to(torch.bfloat16)
    dy = torch.randn(333, 1000, device=device, generator=g).to(torch.bfloat16)
    outs = []
    for fn, kw in ((fused_lora_linear, {"backend": "triton"}), (reference_lora_linear, {})):
        xi = x.detach().requires_grad_()
        y = fn(xi, base, a, b, 2.0, **kw)
        outs.append((y, *torch.autograd.grad(y, (xi, a, b), dy)))
    for name, t, e in zip(("y", "dx", "dA", "dB"), *outs):
        good = torch.allclose(t.float(), e.float(), atol=5e-3 * e.float().abs().max().item(), rtol=5e-2)
        print(f"fused_lora_linear {name}: {'PASS' if good else 'FAIL'} "
              f"(max abs diff {(t.float() - e.float()).abs().max().item():.3g})")
        ok &= good
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="CUDA sweep (Triton path) after a parity check")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one iteration")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    if args.gpu and not parity_check(device):
        raise SystemExit("parity FAILED on the GPU: not timing a wrong kernel")
    if args.smoke:
        shapes, tokens_list, iters, r = [(256, 384)], [64], 1, 16
    elif args.gpu:
        shapes, tokens_list, iters, r = SHAPES, [2048, 4096, 8192, 16384], 10, 16
    else:
        shapes, tokens_list, iters, r = SHAPES, [256, 512], 3, 16
    backend = "triton" if args.gpu else "torch"
    rows = []
    for in_f, out_f in shapes:
        layer, base, a, b = build(in_f, out_f, r, device)
        for tokens in tokens_list:
            g = torch.Generator(device=device).manual_seed(1)
            x = torch.randn(tokens, in_f, device=device, generator=g).to(torch.bfloat16)
            dy = torch.randn(tokens, out_f, device=device, generator=g).to(torch.bfloat16)
            for method in ("peft", "peftlab"):
                fn = step_fn(method, layer, base, a, b, x, dy, backend)
                if args.gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base_mem = torch.cuda.memory_allocated()
                ms = median_time_ms(fn, warmup=0 if args.smoke else 1, iters=iters)
                row = {"layer": f"{in_f}->{out_f}", "tokens": tokens, "r": r, "method": method,
                       "backend": "peft+bnb" if method == "peft" else backend, "fwd_bwd_ms": ms}
                if args.gpu:
                    row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
                elif not args.smoke:
                    row["peak_rss_mb"] = cpu_peak_rss(method, in_f, out_f, r, tokens)
                rows.append(row)
                append_jsonl("bench_fused_lora_linear", row, results_dir=args.results_dir)
    print_table(rows, ["layer", "tokens", "r", "method", "backend", "fwd_bwd_ms", "peak_mem_mb", "peak_rss_mb"])


def cpu_peak_rss(method: str, in_f: int, out_f: int, r: int, tokens: int) -> float:
    """Peak RSS (MB) of one forward+backward in a fresh process, minus the same process without the step."""
    setup = (f"import sys; sys.path.insert(0, 'bench'); import torch; from bench_fused_lora_linear import build, "
             f"step_fn\nlayer, base, a, b = build({in_f}, {out_f}, {r}, 'cpu')\n"
             f"x = torch.randn({tokens}, {in_f}).to(torch.bfloat16); dy = torch.randn({tokens}, {out_f}).to("
             f"torch.bfloat16)\n")
    with_step = run_peak_rss(setup + f"step_fn('{method}', layer, base, a, b, x, dy, 'torch')()\n")
    without = run_peak_rss(setup)
    return with_step["peak_rss_mb"] - without["peak_rss_mb"]


if __name__ == "__main__":
    main()
