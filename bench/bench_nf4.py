"""Benchmark: 4-bit dequantisation throughput, peftlab vs bitsandbytes.

    python bench/bench_nf4.py            # CPU: peftlab PyTorch reference vs bitsandbytes (CPU kernels)
    python bench/bench_nf4.py --gpu      # GPU: bitwise parity PASS/FAIL, then Triton vs bitsandbytes CUDA
    python bench/bench_nf4.py --smoke    # tiny sizes, one iteration

GB/s counts bytes moved: packed codes + scales read, 16-bit output written. Results are printed and
appended to bench/results/bench_nf4.jsonl (device, versions, git commit, command).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, median_time_ms, print_table

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def main() -> None:
    import bitsandbytes.functional as bnbF
    from peftlab.kernels.nf4 import nf4_dequantize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    shapes = [(128, 256)] if args.smoke else SHAPES
    iters = 1 if args.smoke else (20 if args.gpu else 3)
    backend = "triton" if args.gpu else "torch"
    rows, all_ok = [], True
    for shape in shapes:
        for nested in (False, True):
            w = (torch.randn(shape) * 0.02).to(torch.bfloat16).to(device)
            packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
            ours = nf4_dequantize(packed, qs, backend=backend)
            exact = torch.equal(ours, bnbF.dequantize_4bit(packed, qs))
            all_ok &= exact
            scale_bytes = qs.absmax.numel() * qs.absmax.element_size()
            moved = packed.numel() + scale_bytes + ours.numel() * ours.element_size()
            for method, fn in (("bitsandbytes", lambda p=packed, q=qs: bnbF.dequantize_4bit(p, q)),
                               ("peftlab", lambda p=packed, q=qs: nf4_dequantize(p, q, backend=backend))):
                ms = median_time_ms(fn, warmup=0 if args.smoke else 1, iters=iters)
                row = {"shape": f"{shape[0]}x{shape[1]}", "double_quant": nested, "method": method,
                       "backend": backend if method == "peftlab" else "bnb", "ms": ms, "GB/s": moved / ms / 1e6,
                       "bitwise_equal": exact}
                rows.append(row)
                append_jsonl("bench_nf4", row, results_dir=args.results_dir)
    print_table(rows, ["shape", "double_quant", "method", "backend", "ms", "GB/s", "bitwise_equal"])
    print(f"parity (bitwise vs bitsandbytes): {'PASS' if all_ok else 'FAIL'}")


if __name__ == "__main__":
    main()
