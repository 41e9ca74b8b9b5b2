"""Extra peak memory and time of the DPO loss head: fused per-sequence log-probs vs full logits vs TRL 1.16's head.

Setting: one DPO step's loss head on a (Q)LoRA model — frozen head (V × H), final hidden states of P pairs
(chosen + rejected, 2P sequences of T tokens, the first ``--prompt`` tokens of each masked as prompt) requiring
grad; per-sequence label log-probs → ``dpo_loss`` (sigmoid, β 0.1, fixed reference log-probs) → backward.

Methods (CPU: each in its own subprocess, peak RSS minus the "inputs" subprocess that builds the same tensors
and imports the same modules, so ``above_inputs_mb`` is the loss head's own extra memory):

- ``full_logits``: logits (2P, T, V) in fp32 → log_softmax → gather → masked sum: the classic way (TRL's
  DPOTrainer before its fused LM head; ``trl.trainer.utils.selective_log_softmax`` computes the same thing).
- ``trl_chunked``: TRL 1.16's ``trl.kernels.ChunkedLogProbFunction`` as ``DPOTrainer`` calls it through
  ``add_fused_lm_head`` (off CUDA it scores every position and masks afterwards, as TRL does there). Needs trl.
- ``fused``: :func:`peftlab.kernels.fused_linear_sequence_logprobs` (backend "auto": PyTorch on CPU).

    python bench/bench_fused_linear_logprobs.py            # CPU: 2 pairs × 2 × 512 tokens, H 1024, V 128256
    python bench/bench_fused_linear_logprobs.py --methods fused    # one method (+ the inputs baseline)
    python bench/bench_fused_linear_logprobs.py --smoke    # tiny, in-process: the methods agree (used by a test)

``--smoke`` runs full_logits and fused in this process on tiny shapes (no memory figures: one process cannot
separate two methods' peaks) and checks they give the same log-probs and gradient. Results: a table on stdout
and JSON lines in bench/results/fused_linear_logprobs.jsonl. No GPU mode yet: figures here are CPU figures.
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

NAME = "fused_linear_logprobs"
METHODS = ("full_logits", "trl_chunked", "fused")


def build_inputs(pairs: int, seq: int, prompt: int, h: int, v: int, seed: int = 0) -> dict[str, Any]:
    """hidden (2P, T, H) fp32 requiring grad, frozen head (V, H), labels with the prompt masked, reference logps."""
    import torch

    torch.manual_seed(seed)
    hidden = torch.empty(2 * pairs, seq, h).normal_(0, 1).requires_grad_()
    weight = torch.empty(v, h).normal_(0, 0.02)
    labels = torch.randint(0, v, (2 * pairs, seq))
    labels[:, :prompt] = -100
    ref = -torch.rand(2 * pairs) * seq  # any fixed reference log-probs
    return {"hidden": hidden, "weight": weight, "labels": labels, "ref": ref, "pairs": pairs}


def sequence_logps(method: str, hidden, weight, labels):
    """(2P,) summed label log-probs by ``method``."""
    import torch

    mask = labels != -100
    if method == "full_logits":
        logits = hidden @ weight.t()  # (2P, T, V) fp32
        per_token = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (per_token * mask).sum(-1)
    if method == "trl_chunked":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        # add_fused_lm_head's call off CUDA (compact=False): all rows, chunk 32768 of the vocab, masked after
        per_token = ChunkedLogProbFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, None,
                                                 labels.clamp(min=0).reshape(-1), 1.0, 32768, None, 1.0,
                                                 ("log_probs",))[0]
        return per_token.view(labels.shape).masked_fill(~mask, 0).sum(-1)
    from peftlab.kernels.fused_linear_logprobs import fused_linear_sequence_logprobs

    return fused_linear_sequence_logprobs(hidden, weight, labels)[0]


def run_method(method: str, inp: dict[str, Any]) -> dict[str, float]:
    """One forward + backward of the DPO loss head; returns the loss and checksums of logps and grad."""
    from peftlab.objectives.preference_losses import dpo_loss

    hidden, p = inp["hidden"], inp["pairs"]
    hidden.grad = None
    logps = sequence_logps(method, hidden, inp["weight"], inp["labels"])
    loss = dpo_loss(logps[:p], logps[p:], inp["ref"][:p], inp["ref"][p:]).loss
    loss.backward()
    return {"loss": float(loss.detach()), "logps_sum": float(logps.detach().sum()),
            "grad_abs_sum": float(hidden.grad.abs().sum())}


_SNIPPET = """
import sys, time
sys.path.insert(0, {bench_dir!r})
import torch
import peftlab.kernels.fused_linear_logprobs, peftlab.objectives.preference_losses  # imports are not the head's memory
try:  # every subprocess imports what trl_chunked imports (its backward imports trl.trainer.utils)
    import trl.kernels.chunked_logprob, trl.trainer.utils
except ImportError:
    pass
from bench_fused_linear_logprobs import build_inputs, run_method
inp = build_inputs({pairs}, {seq}, {prompt}, {h}, {v})
RESULT = {{}}
if {method!r} != "inputs":
    t0 = time.perf_counter()
    RESULT = run_method({method!r}, inp)
    RESULT["time_s"] = time.perf_counter() - t0
"""


def trl_available() -> bool:
    try:
        import trl.kernels.chunked_logprob  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_measure(cfg: dict[str, int], methods: list[str]) -> list[dict[str, Any]]:
    rows, base = [], None
    for method in ["inputs", *methods]:
        row = {**cfg, "method": method, "dtype": "float32"}
        res = common.run_peak_rss(_SNIPPET.format(bench_dir=str(BENCH_DIR), method=method, **cfg))
        row["peak_rss_mb"] = res["peak_rss_mb"]
        row.update(res["result"] or {})
        if method == "inputs":
            base = res["peak_rss_mb"]
        else:
            row["above_inputs_mb"] = res["peak_rss_mb"] - base
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["method"]: r for r in rows}
    for ref in ("full_logits", "trl_chunked"):
        if ref in by and "fused" in by and by[ref].get("above_inputs_mb"):
            by["fused"][f"above_inputs_ratio_vs_{ref}"] = by["fused"]["above_inputs_mb"] / by[ref]["above_inputs_mb"]
    return rows


def smoke(cfg: dict[str, int]) -> list[dict[str, Any]]:
    """full_logits and fused in this process: the same log-probs and gradient, and their times."""
    import time

    rows = []
    for method in ("full_logits", "fused"):
        inp = build_inputs(**cfg)
        t0 = time.perf_counter()
        res = run_method(method, inp)
        rows.append({**cfg, "method": method, "dtype": "float32", **res, "time_s": time.perf_counter() - t0})
    a, b = rows
    for key in ("loss", "logps_sum", "grad_abs_sum"):
        if abs(a[key] - b[key]) > 1e-4 * max(1.0, abs(a[key])):
            raise SystemExit(f"fused and full_logits disagree on {key}: {b[key]} vs {a[key]}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, in-process agreement check, < 5 s")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence (masked)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: all")
    ap.add_argument("--results-dir", type=Path, default=None, help="where the JSONL goes (default bench/results)")
    args = ap.parse_args(argv)
    cfg = {"pairs": args.pairs, "seq": args.seq, "prompt": args.prompt, "h": args.hidden, "v": args.vocab}
    if args.smoke:
        cfg = {"pairs": 2, "seq": 16, "prompt": 5, "h": 32, "v": 1000}
        rows = smoke(cfg)
        cols = ["pairs", "seq", "prompt", "h", "v", "method", "loss", "logps_sum", "time_s"]
    else:
        methods = [m for m in args.methods if m != "trl_chunked" or trl_available()]
        rows = cpu_measure(cfg, methods)
        cols = ["pairs", "seq", "prompt", "h", "v", "method", "peak_rss_mb", "above_inputs_mb",
                "above_inputs_ratio_vs_full_logits", "above_inputs_ratio_vs_trl_chunked", "time_s", "loss"]
    print()
    common.print_table(rows, cols)
    for r in rows:
        common.append_jsonl(NAME, {**r, "smoke": args.smoke}, results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
