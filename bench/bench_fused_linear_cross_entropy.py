"""Peak memory and time of fused linear cross-entropy vs ``lm_head`` + ``F.cross_entropy`` (as HF computes it).

Setting: a LoRA/QLoRA step — the head is frozen, the final hidden states require grad; one forward +
backward of the loss head, normalised by the number of target tokens.

CPU (default): each (config, method) runs in its own subprocess and reports its peak RSS
(its own VmHWM), plus an "inputs" subprocess that only builds the tensors, so the loss head's own
memory is ``peak - inputs``. fp32 (CPU training math). GPU (``--gpu``): first checks Triton-vs-reference
parity on the GPU (PASS/FAIL), then ``torch.cuda.max_memory_allocated`` above the inputs and the
``triton.testing.do_bench`` median, in bf16.

    python bench/bench_fused_linear_cross_entropy.py              # CPU, BT = 2k, 8k
    python bench/bench_fused_linear_cross_entropy.py --gpu        # GPU parity + BT = 2k, 8k, 32k
    python bench/bench_fused_linear_cross_entropy.py --smoke      # tiny, < 20 s (used by a test)
    python bench/bench_fused_linear_cross_entropy.py --head-dtype bfloat16 --hidden-size 768 --bt 2048
        # model.frozen_16bit on the CPU: a bf16 head under fp32 hidden states; "fused" takes the online path
        # (vocabulary outer), "fused_rows" the row chunks it replaced (each chunk upcasts the head twice)

Results: a table on stdout and JSON lines in bench/results/fused_linear_cross_entropy.jsonl.
Needs only torch, triton (GPU), peftlab and psutil.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import common

NAME = "fused_linear_cross_entropy"
IGNORE_FRACTION = 0.1  # prompt tokens masked with -100


# ----------------------------------------------------------------------------------------------------
# Inputs and methods (also imported by the measuring subprocesses)
# ----------------------------------------------------------------------------------------------------
def build_inputs(bt: int, h: int, v: int, dtype: str, device: str, seed: int = 0,
                 head_dtype: str | None = None) -> dict[str, Any]:
    """hidden (BT × H, requires grad), frozen head (V × H, ``head_dtype``, default ``dtype``), labels; created in
    place (no fp32 temporaries)."""
    import torch

    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    hidden = torch.empty(bt, h, dtype=dt, device=device).normal_(0, 1).requires_grad_()
    weight = torch.empty(v, h, dtype=getattr(torch, head_dtype or dtype), device=device).normal_(0, 0.02)
    labels = torch.randint(0, v, (bt,), device=device)
    labels[torch.rand(bt, device=device) < IGNORE_FRACTION] = -100
    return {"hidden": hidden, "weight": weight, "labels": labels, "n_targets": int((labels != -100).sum())}


def run_method(method: str, inp: dict[str, Any]) -> float:
    """One forward + backward; returns the loss."""
    import torch

    hidden, weight, labels, n = inp["hidden"], inp["weight"], inp["labels"], inp["n_targets"]
    hidden.grad = None
    if method == "unfused":  # transformers' ForCausalLMLoss: logits upcast to fp32, CE summed / n
        logits = hidden @ weight.to(hidden.dtype).t()
        logits = logits.float()
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / n
        del logits
    else:
        from peftlab.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        backend = rows_only(method)
        loss = fused_linear_cross_entropy(hidden, weight, labels, normalizer=n, backend=backend)
    loss.backward()
    return float(loss.detach())


def rows_only(method: str) -> str:
    """The backend of a fused method; ``fused_rows`` also switches the online path off (this process only), so
    a 16-bit head takes the row chunks the online path replaced."""
    import importlib

    if method == "fused_rows":
        importlib.import_module("peftlab.kernels.fused_linear_cross_entropy").online_applies = lambda *a: False
    return {"fused": "auto", "fused_rows": "torch", "fused_triton": "triton", "fused_torch": "torch"}[method]


_SNIPPET = """
import sys, time
sys.path.insert(0, {bench_dir!r})
import torch
import peftlab.kernels.fused_linear_cross_entropy, peftlab.kernels.fused_linear_kd_loss  # imports are not the loss's memory
from {module} import build_inputs, run_method
inp = build_inputs({bt}, {h}, {v}, {dtype!r}, "cpu", head_dtype={head_dtype!r})
RESULT = {{}}
if {method!r} != "inputs":
    t0 = time.perf_counter()
    loss = run_method({method!r}, inp)
    RESULT = {{"time_s": time.perf_counter() - t0, "loss": loss}}
"""


def cpu_sweep(bts: list[int], h: int, v: int, methods: list[str], module: str, snippet: str,
              extra: dict[str, Any], need_bytes) -> list[dict[str, Any]]:
    """Run every (BT, method) in its own subprocess; rows with peak RSS, memory above inputs, time."""
    import psutil

    rows = []
    for bt in bts:
        base = None
        for method in ["inputs", *methods]:
            row = {"bt": bt, "h": h, "v": v, "method": method, **extra}
            need = need_bytes(bt, method)
            avail = psutil.virtual_memory().available
            if need > 0.9 * avail:
                row["skipped"] = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
                rows.append(row)
                continue
            res = common.run_peak_rss(snippet.format(bench_dir=str(BENCH_DIR), module=module, bt=bt, h=h, v=v,
                                                     method=method, **extra))
            row["peak_rss_mb"] = res["peak_rss_mb"]
            row.update(res["result"] or {})
            if method == "inputs":
                base = res["peak_rss_mb"]
            elif base is not None:
                row["above_inputs_mb"] = res["peak_rss_mb"] - base
            rows.append(row)
            print(json.dumps(row), flush=True)
        add_ratios(rows, bt)
    return rows


def add_ratios(rows: list[dict[str, Any]], bt: int) -> None:
    """fused/unfused ratios of peak and of memory above inputs, for the rows of one BT."""
    by = {r["method"]: r for r in rows if r["bt"] == bt}
    ref = by.get("unfused")
    for r in by.values():
        if ref is None or r is ref or r["method"] == "inputs" or "peak_rss_mb" not in r or "peak_rss_mb" not in ref:
            continue
        r["peak_ratio_vs_unfused"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        if r.get("above_inputs_mb") and ref.get("above_inputs_mb"):
            r["above_inputs_ratio_vs_unfused"] = r["above_inputs_mb"] / ref["above_inputs_mb"]


def ce_need_bytes(bt: int, v: int, method: str) -> int:
    # unfused fp32: logits + log-softmax output + two gradient buffers of BT × V alive in backward
    return 4 * bt * v * 4 if method == "unfused" else 0


# ----------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------
def gpu_parity() -> bool:
    """Triton vs the full-logits reference on the GPU (loss and grads), the test tolerances."""
    import torch
    from peftlab.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy as fused
    from peftlab.kernels.fused_linear_cross_entropy import reference_linear_cross_entropy as ref

    ok = True
    cases = [((47, 31, 123), {}), ((47, 31, 123), {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0}),
             ((1000, 512, 32000), {"reduction": "mean"}), ((2048, 4096, 128256), {"normalizer": 1000.0}),
             ((300, 256, 5000), {"reduction": "none", "softcap": 30.0})]
    tol = {torch.float32: (1e-5, 5e-4), torch.bfloat16: (5e-3, 5e-2)}
    for dtype in (torch.float32, torch.bfloat16):
        for (bt, h, v), kw in cases:
            g = torch.Generator(device="cuda").manual_seed(0)
            hidden = torch.randn(bt, h, device="cuda", generator=g).to(dtype).requires_grad_()
            weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).to(dtype).requires_grad_()
            bias = (torch.randn(v, device="cuda", generator=g) * 0.1).to(dtype).requires_grad_()
            labels = torch.randint(0, v, (bt,), device="cuda", generator=g)
            labels[::7] = -100
            up = torch.randn(bt, device="cuda") if kw.get("reduction") == "none" else None
            loss = fused(hidden, weight, labels, head_bias=bias, backend="triton", **kw)
            grads = torch.autograd.grad(loss if up is None else (loss * up).sum(), (hidden, weight, bias))
            leaves = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
            r = ref(leaves[0], leaves[1], labels, head_bias=leaves[2], **kw)
            rgrads = torch.autograd.grad(r if up is None else (r * up).sum(), leaves)
            atol, rtol = tol[dtype]
            errs = []
            for name, a, b in zip(("loss", "hidden", "weight", "bias"), (loss, *grads), (r, *rgrads)):
                if not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol):
                    errs.append(f"{name} max|diff|={float((a.float() - b.float()).abs().max()):.3g}")
            status = "PASS" if not errs else "FAIL " + ", ".join(errs)
            ok &= not errs
            print(f"parity {dtype!s:15} BT={bt:<5} H={h:<5} V={v:<6} {kw}: {status}", flush=True)
            del hidden, weight, bias, grads, leaves, rgrads, loss, r
            torch.cuda.empty_cache()
    return ok


def gpu_measure(build, run, methods: list[str], configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each config and method: peak CUDA memory above inputs (MB) and do_bench median (ms)."""
    import torch
    import triton

    rows = []
    for cfg in configs:
        for method in methods:
            row = {**cfg, "method": method}
            try:
                inp = build(**cfg, device="cuda")
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run(method, inp)
                torch.cuda.synchronize()
                row["peak_above_inputs_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                row["median_ms"] = triton.testing.do_bench(lambda m=method, i=inp: run(m, i), return_mode="median")
            except torch.OutOfMemoryError:
                row["oom"] = True
            finally:
                inp = None
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="GPU parity check + sweep (BT 2k, 8k, 32k; bf16)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one iteration, < 20 s")
    ap.add_argument("--bt", type=int, nargs="+", help="token counts (default 2048 8192; GPU adds 32768)")
    ap.add_argument("--results-dir", type=Path, default=None, help="where the JSONL goes (default bench/results)")
    ap.add_argument("--head-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="CPU: the head's dtype under fp32 hidden states (bfloat16 = model.frozen_16bit; adds the "
                         "row-chunked 'fused_rows' beside the online 'fused')")
    ap.add_argument("--hidden-size", type=int, default=None, help="hidden size (default 4096; smoke 64)")
    args = ap.parse_args(argv)
    h, v = 4096, 128256
    if args.smoke:
        h, v = 64, 1000
    h = args.hidden_size or h
    if args.gpu:
        ok = gpu_parity()
        print("GPU parity:", "PASS" if ok else "FAIL", flush=True)
        bts = args.bt or ([256] if args.smoke else [2048, 8192, 32768])
        rows = gpu_measure(lambda bt, h, v, dtype, device: build_inputs(bt, h, v, dtype, device), run_method,
                           ["unfused", "fused_triton", "fused_torch"],
                           [{"bt": bt, "h": h, "v": v, "dtype": "bfloat16"} for bt in bts])
        for r in rows:
            r["parity"] = "PASS" if ok else "FAIL"
        cols = ["bt", "h", "v", "dtype", "method", "peak_above_inputs_mb", "median_ms", "oom"]
    else:
        bts = args.bt or ([64] if args.smoke else [2048, 8192])
        methods = ["unfused", "fused"] + (["fused_rows"] if args.head_dtype not in (None, "float32") else [])
        rows = cpu_sweep(bts, h, v, methods, "bench_fused_linear_cross_entropy", _SNIPPET,
                         {"dtype": "float32", "head_dtype": args.head_dtype or "float32"},
                         lambda bt, m: ce_need_bytes(bt, v, m))
        cols = ["bt", "h", "v", "dtype", "head_dtype", "method", "peak_rss_mb", "above_inputs_mb", "peak_ratio_vs_unfused",
                "above_inputs_ratio_vs_unfused", "time_s", "loss", "skipped"]
    print()
    common.print_table(rows, cols)
    for r in rows:
        common.append_jsonl(NAME, {**r, "smoke": args.smoke}, results_dir=args.results_dir)
    return 0 if not args.gpu or all(r.get("parity") == "PASS" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
