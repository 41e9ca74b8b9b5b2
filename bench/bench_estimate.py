#!/usr/bin/env python3
"""The memory planner against measurement: ``peftlab estimate``'s predicted peak vs the measured peak
resident set of the same QLoRA run (a fresh process per case, its own VmHWM), on this CPU.

Cases (model x sequence length x gradient checkpointing): the built-in tiny model (the quickstart's),
a ~100M Llama (Llama-2 32k vocabulary), Llama-3.2-1B's architecture (128k vocabulary, tied head) and
— from bench/scale.py's last full run, when present — Llama-3.1-8B's. Models are random-init
checkpoints built from the configs in ../shared/data (written once under --work); the data are
packed Alpaca rows, so every micro-batch holds exactly ``seq`` tokens.

    python -P bench/bench_estimate.py [--only tiny small 1b] [--threads 2]
    python -P bench/bench_estimate.py --smoke --results-dir /tmp/r

Prints the table (predicted, measured, error) and appends one JSON line per case to
``bench/results/bench_estimate.jsonl``. Goal (issue 10): |error| <= 15% everywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import append_jsonl, print_table
from scale import GB, SHARED, ensure_checkpoint, measure_train, recipe_dict
from scale import RESULTS_NAME as SCALE_RESULTS

SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768,
         "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
         "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}

# name -> (config, tokenizer dir, dtype, [(seq, micro_batch, gradient_checkpointing, host_allocator), ...])
CASES: dict[str, tuple[Any, str | None, str, list[tuple[int, int, bool, str]]]] = {
    "tiny": ("builtin:tiny-llama", None, "float32", [(256, 4, False, "default"), (256, 4, True, "default"),
                                                     (1024, 2, False, "default")]),
    "small": (SMALL, "llama2-7b-chat", "float32", [(512, 2, False, "default"), (512, 2, True, "default"),
                                                   (1024, 4, True, "default"), (1024, 4, True, "bounded")]),
    "1b": ("llama-3.2-1b", "llama3-8b-instruct", "bfloat16", [(512, 1, False, "default"), (1024, 1, True, "default"),
                                                              (2048, 1, True, "default"), (2048, 1, True, "bounded")]),
}


def _config(spec: Any) -> dict[str, Any] | str:
    if isinstance(spec, dict):
        return dict(spec)
    if spec.startswith("builtin:"):
        return spec
    return json.loads((SHARED / "configs" / spec / "config.json").read_text())


def scale_rows(results_dir: Path | None, work: Path) -> list[dict[str, Any]]:
    """The 8B training runs of bench/scale.py (the newest full run per host allocator) against the
    planner of THIS checkout (from the config alone), with the prediction made at run time beside it."""
    from peftlab.engine.planner import estimate
    from peftlab.recipe.parse import recipe_from_dict

    path = (results_dir or HERE / "results") / f"{SCALE_RESULTS}.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows = [r for r in rows if r.get("phase") == "train" and not r.get("smoke") and not r.get("over_limit")]
    latest = {r.get("host_allocator", "default"): r for r in rows}
    out = []
    for allocator, r in latest.items():
        cfg, tok = SHARED / "configs" / r["config"], SHARED / "tokenizers" / "llama3-8b-instruct"
        if not (cfg / "config.json").is_file() or not tok.is_dir():
            continue
        raw = recipe_dict(cfg, work, seq=r["seq"], steps=1, dtype=r["dtype"], host_allocator=allocator)
        raw["model"]["tokenizer"] = str(tok)
        predicted = estimate(recipe_from_dict(raw), device="cpu").total / GB
        out.append({"case": f"{r['config']} (scale.py)", "seq": r["seq"], "micro_batch": 1, "ckpt": True,
                    "allocator": allocator, "dtype": r["dtype"], "predicted_gb": predicted,
                    "measured_gb": r["peak_rss_gb"], "error": predicted / r["peak_rss_gb"] - 1,
                    "predicted_at_run_gb": r["predicted_gb"], "step_s": r.get("step_s"), "from": r["git_commit"]})
    return out


def repredict(name: str, ckpt: Path, work: Path, *, seq: int, mbs: int, ckpting: bool, allocator: str, dtype: str,
              results_dir: Path | None) -> dict[str, Any] | None:
    """The newest measured row of this case with the planner of THIS checkout (measurement unchanged)."""
    from peftlab.engine.planner import estimate
    from peftlab.recipe.parse import recipe_from_dict

    path = (results_dir or HERE / "results") / "bench_estimate.jsonl"
    if not path.is_file():
        return None
    key = (name, seq, mbs, ckpting, allocator)
    found = [r for r in map(json.loads, path.read_text().splitlines())
             if (r["case"], r["seq"], r["micro_batch"], r["ckpt"], r.get("allocator", "default")) == key
             and not r.get("smoke") and not r.get("repredicted") and not r.get("over_limit")]
    if not found:
        return None
    m = found[-1]
    raw = recipe_dict(ckpt, work, seq=seq, steps=2, dtype=dtype, checkpointing=ckpting, micro_batch=mbs,
                      host_allocator=allocator)
    est = estimate(recipe_from_dict(raw), device="cpu")
    return {"case": name, "seq": seq, "micro_batch": mbs, "ckpt": ckpting, "allocator": allocator, "dtype": dtype,
            "predicted_gb": est.total / GB, "measured_gb": m["measured_gb"], "error": est.total / GB / m["measured_gb"] - 1,
            "step_s": m.get("step_s"), "measured_at": m["git_commit"], "predicted_at_run_gb": m["predicted_gb"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, choices=list(CASES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--max-rss-gb", type=float, default=20.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--predict-only", action="store_true",
                    help="no training: re-predict the newest measurement of every case with this checkout's planner")
    ns = ap.parse_args(argv)
    results_dir = Path(ns.results_dir) if ns.results_dir else None
    cases = dict(CASES)
    if ns.smoke:
        # A built-in model (built once, cached; the "tiny" case's path): no checkpoint to write, so the parent
        # process needs neither transformers' model code nor the save. bench/scale.py --smoke covers ensure_checkpoint.
        cases = {"smoke": ("builtin:micro-llama", None, "float32", [(64, 2, False, "default"), (64, 2, True, "bounded")])}
        work = Path(tempfile.mkdtemp(prefix="peftlab-estimate-smoke-"))
        ns.steps = 1
    else:
        work = Path(ns.work or Path(tempfile.gettempdir()) / "peftlab-scale")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (spec, tok, dtype, points) in cases.items():
        if ns.only and name not in ns.only:
            continue
        if tok and not (SHARED / "tokenizers" / tok).is_dir():
            print(f"skip {name}: ../shared/data/tokenizers/{tok} not found")
            continue
        config = _config(spec)
        if isinstance(config, str):
            from peftlab.model.load import resolve_model_path

            ckpt = Path(resolve_model_path(config))
        else:
            ckpt = ensure_checkpoint(config, work, tokenizer=str(SHARED / "tokenizers" / tok) if tok else None)
        for seq, mbs, ckpting, allocator in points:
            if ns.predict_only:
                row = repredict(name, ckpt, work, seq=seq, mbs=mbs, ckpting=ckpting, allocator=allocator, dtype=dtype,
                                results_dir=results_dir)
                if row:
                    rows.append(row)
                    append_jsonl("bench_estimate", {**row, "repredicted": True, "smoke": ns.smoke}, results_dir)
                continue
            print(f"== {name}: seq {seq} x {mbs}, checkpointing {ckpting}, host allocator {allocator}", flush=True)
            res = measure_train(ckpt, work, seq=seq, steps=ns.steps, dtype=dtype, threads=ns.threads,
                                max_rss_gb=ns.max_rss_gb, checkpointing=ckpting, micro_batch=mbs,
                                host_allocator=allocator)
            row = {"case": name, "seq": seq, "micro_batch": mbs, "ckpt": ckpting, "allocator": allocator, "dtype": dtype,
                   "predicted_gb": res["predicted_gb"], "measured_gb": res["peak_rss_gb"],
                   "error": res.get("prediction_error"), "over_limit": res.get("over_limit", False),
                   "step_s": res.get("step_s"), "predicted": res["predicted"], "smoke": ns.smoke}
            rows.append(row)
            append_jsonl("bench_estimate", row, results_dir)
    rows += [] if ns.smoke else scale_rows(results_dir, work)
    print()
    print_table(rows, ["case", "dtype", "seq", "micro_batch", "ckpt", "allocator", "predicted_gb", "measured_gb",
                       "error", "step_s"])
    worst = max((abs(r["error"]) for r in rows if r.get("error") is not None), default=0.0)
    print(f"\nworst |error|: {worst:.1%} (goal: <= 15%)")
    if ns.smoke:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
