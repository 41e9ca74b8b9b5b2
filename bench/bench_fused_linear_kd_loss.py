"""Peak memory and time of the fused linear KD loss vs full student + teacher logits (plain PyTorch).

Setting: distillation step with a frozen student head (LoRA), student hidden states requiring grad,
teacher hidden states without grad; L = α·CE + (1-α)·T²·KL(teacher‖student), α = 0.5, T = 2.
Same measurement scheme as bench_fused_linear_cross_entropy.py (CPU: peak RSS per subprocess, fp32;
GPU: parity PASS/FAIL, then max_memory_allocated above inputs and do_bench median, bf16).

    python bench/bench_fused_linear_kd_loss.py            # CPU, BT = 2k
    python bench/bench_fused_linear_kd_loss.py --gpu      # GPU parity + BT = 2k, 8k
    python bench/bench_fused_linear_kd_loss.py --smoke    # tiny, < 20 s
    python bench/bench_fused_linear_kd_loss.py --head-dtype bfloat16 --hidden-size 768 --bt 2048
        # model.frozen_16bit on the CPU: bf16 heads under fp32 hidden states; "fused" takes the online path
        # (torch_kd_online), "fused_rows" the row chunks it replaced
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import common
from bench_fused_linear_cross_entropy import _SNIPPET, IGNORE_FRACTION, cpu_sweep, gpu_measure, rows_only

NAME = "fused_linear_kd_loss"
ALPHA, TEMPERATURE = 0.5, 2.0


def build_inputs(bt: int, h: int, v: int, dtype: str, device: str, seed: int = 0,
                 head_dtype: str | None = None) -> dict[str, Any]:
    """Student/teacher hidden (BT × H) and heads (V × H, ``head_dtype``, default ``dtype``), created in place; the
    teacher has the same H."""
    import torch

    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    hdt = getattr(torch, head_dtype or dtype)
    labels = torch.randint(0, v, (bt,), device=device)
    labels[torch.rand(bt, device=device) < IGNORE_FRACTION] = -100
    return {
        "s_hidden": torch.empty(bt, h, dtype=dt, device=device).normal_(0, 1).requires_grad_(),
        "s_head": torch.empty(v, h, dtype=hdt, device=device).normal_(0, 0.02),
        "t_hidden": torch.empty(bt, h, dtype=dt, device=device).normal_(0, 1),
        "t_head": torch.empty(v, h, dtype=hdt, device=device).normal_(0, 0.02),
        "labels": labels,
        "n_targets": int((labels != -100).sum()),
    }


def run_method(method: str, inp: dict[str, Any]) -> float:
    """One forward + backward of the KD loss; returns the loss."""
    import torch
    import torch.nn.functional as F

    sh, sw, th, tw, labels, n = (inp[k] for k in ("s_hidden", "s_head", "t_hidden", "t_head", "labels", "n_targets"))
    sh.grad = None
    if method == "unfused":
        s = (sh @ sw.to(sh.dtype).t()).float()
        with torch.no_grad():
            t = (th @ tw.to(th.dtype).t()).float()
        valid = labels != -100
        ce = F.cross_entropy(s, labels, ignore_index=-100, reduction="none")
        kl = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1), reduction="none",
                      log_target=True).sum(-1)
        loss = torch.where(valid, ALPHA * ce + (1 - ALPHA) * TEMPERATURE**2 * kl, 0.0).sum() / n
        del s, t
    else:
        from peftlab.kernels.fused_linear_kd_loss import fused_linear_kd_loss

        backend = rows_only(method)
        loss = fused_linear_kd_loss(sh, sw, th, tw, labels, kind="forward_kl", alpha=ALPHA,
                                    temperature=TEMPERATURE, normalizer=n, backend=backend)
    loss.backward()
    return float(loss.detach())


def gpu_parity() -> bool:
    """Triton vs reference KD on the GPU for each kind, fp32 and bf16, at the test tolerances."""
    import torch
    from peftlab.kernels.fused_linear_kd_loss import fused_linear_kd_loss, reference_linear_kd_loss

    ok = True
    tol = {torch.float32: (1e-5, 5e-4), torch.bfloat16: (5e-3, 5e-2)}
    for dtype in (torch.float32, torch.bfloat16):
        for (bt, hs, ht, v), kw in [((47, 31, 20, 123), {"kind": "forward_kl"}),
                                    ((47, 31, 20, 123), {"kind": "reverse_kl", "temperature": 2.0}),
                                    ((500, 512, 768, 32000), {"kind": "jsd", "beta": 0.5, "reduction": "mean"}),
                                    ((1024, 4096, 4096, 128256), {"kind": "forward_kl", "normalizer": 900.0})]:
            g = torch.Generator(device="cuda").manual_seed(0)
            sh = torch.randn(bt, hs, device="cuda", generator=g).to(dtype).requires_grad_()
            sw = (torch.randn(v, hs, device="cuda", generator=g) / hs**0.5).to(dtype).requires_grad_()
            th = torch.randn(bt, ht, device="cuda", generator=g).to(dtype)
            tw = (torch.randn(v, ht, device="cuda", generator=g) / ht**0.5).to(dtype)
            labels = torch.randint(0, v, (bt,), device="cuda", generator=g)
            labels[::7] = -100
            loss = fused_linear_kd_loss(sh, sw, th, tw, labels, backend="triton", **kw)
            grads = torch.autograd.grad(loss, (sh, sw))
            leaves = [t.detach().float().requires_grad_() for t in (sh, sw)]
            r = reference_linear_kd_loss(leaves[0], leaves[1], th.float(), tw.float(), labels, **kw)
            rgrads = torch.autograd.grad(r, leaves)
            atol, rtol = tol[dtype]
            errs = [f"{name} max|diff|={float((a.float() - b.float()).abs().max()):.3g}"
                    for name, a, b in zip(("loss", "hidden", "head"), (loss, *grads), (r, *rgrads))
                    if not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)]
            ok &= not errs
            print(f"parity {dtype!s:15} BT={bt:<5} V={v:<6} {kw}: {'PASS' if not errs else 'FAIL ' + ', '.join(errs)}",
                  flush=True)
            del sh, sw, th, tw, grads, leaves, rgrads, loss, r
            torch.cuda.empty_cache()
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="GPU parity check + sweep (BT 2k, 8k; bf16)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one iteration, < 20 s")
    ap.add_argument("--bt", type=int, nargs="+", help="token counts (default 2048; GPU 2048 8192)")
    ap.add_argument("--results-dir", type=Path, default=None, help="where the JSONL goes (default bench/results)")
    ap.add_argument("--head-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="CPU: the heads' dtype under fp32 hidden states (bfloat16 = model.frozen_16bit; adds the "
                         "row-chunked 'fused_rows' beside the online 'fused')")
    ap.add_argument("--hidden-size", type=int, default=None, help="hidden size (default 4096; smoke 64)")
    args = ap.parse_args(argv)
    h, v = (64, 1000) if args.smoke else (4096, 128256)
    h = args.hidden_size or h
    if args.gpu:
        ok = gpu_parity()
        print("GPU parity:", "PASS" if ok else "FAIL", flush=True)
        bts = args.bt or ([256] if args.smoke else [2048, 8192])
        rows = gpu_measure(build_inputs, run_method, ["unfused", "fused_triton", "fused_torch"],
                           [{"bt": bt, "h": h, "v": v, "dtype": "bfloat16"} for bt in bts])
        for r in rows:
            r["parity"] = "PASS" if ok else "FAIL"
        cols = ["bt", "h", "v", "dtype", "method", "peak_above_inputs_mb", "median_ms", "oom"]
    else:
        bts = args.bt or ([64] if args.smoke else [2048])
        # unfused: student + teacher logits, their log-softmaxes at T, KL terms and gradients: ~8 BT × V fp32
        methods = ["unfused", "fused"] + (["fused_rows"] if args.head_dtype not in (None, "float32") else [])
        rows = cpu_sweep(bts, h, v, methods, "bench_fused_linear_kd_loss", _SNIPPET,
                         {"dtype": "float32", "head_dtype": args.head_dtype or "float32"},
                         lambda bt, m: 8 * bt * v * 4 if m == "unfused" else 0)
        cols = ["bt", "h", "v", "dtype", "head_dtype", "method", "peak_rss_mb", "above_inputs_mb", "peak_ratio_vs_unfused",
                "above_inputs_ratio_vs_unfused", "time_s", "loss", "skipped"]
    print()
    common.print_table(rows, cols)
    for r in rows:
        common.append_jsonl(NAME, {**r, "smoke": args.smoke}, results_dir=args.results_dir)
    return 0 if not args.gpu or all(r.get("parity") == "PASS" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
