#!/usr/bin/env python3
"""Run the benchmark suite: `make bench` (CPU) or `make bench-gpu` (CUDA).

Each benchmark is its own script that prints a table and appends JSON lines (device, versions, git
commit, command, figures) to bench/results/; this runner only calls them one after another, each in a
fresh process, and stops at nothing: a failing benchmark is reported and the next one runs.

    python bench/run_all.py --suite cpu|gpu [--smoke] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, arguments) per suite; CPU runs time the PyTorch paths (what CPU training uses), GPU runs the
# Triton kernels after a parity check against the references.
SUITES = {
    "cpu": [
        ("bench_data.py", []),
        ("bench_nf4.py", []),
        ("bench_fused_lora_linear.py", []),
        ("bench_fused_linear_cross_entropy.py", []),
        ("bench_fused_linear_kd_loss.py", []),
        ("bench_qlora_step.py", ["--layers", "2", "--seq", "256", "--iters", "2"]),
    ],
    "gpu": [
        ("bench_nf4.py", ["--gpu"]),
        ("bench_fused_lora_linear.py", ["--gpu"]),
        ("bench_fused_linear_cross_entropy.py", ["--gpu"]),
        ("bench_fused_linear_kd_loss.py", ["--gpu"]),
        ("bench_qlora_step.py", ["--gpu"]),
    ],
}
# benchmarks added by other parts of peftlab join the suites when their scripts exist
OPTIONAL = {"cpu": [("bench_zero.py", []), ("bench_estimate.py", []), ("scale.py", []), ("vs_peers.py", [])],
            "gpu": [("vs_peers.py", ["--gpu"])]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    ap.add_argument("--smoke", action="store_true", help="pass --smoke to every benchmark")
    ap.add_argument("--only", nargs="*", default=None, help="script names to run (default: all)")
    args = ap.parse_args()
    jobs = SUITES[args.suite] + [j for j in OPTIONAL[args.suite] if (HERE / j[0]).is_file()]
    failed = []
    for script, extra in jobs:
        if args.only and script not in args.only and script.removesuffix(".py") not in args.only:
            continue
        cmd = [sys.executable, "-P", str(HERE / script), *extra] + (["--smoke"] if args.smoke else [])
        print(f"\n=== {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"=== {script}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
