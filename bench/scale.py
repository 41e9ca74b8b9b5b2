#!/usr/bin/env python3
"""The 8B-scale QLoRA run on this machine's CPU, and the 4-bit loading comparison beside it.

One Llama-3.1-8B-architecture model (``../shared/data/configs/llama-3.1-8b``; random init, the real
shapes: 32 layers, hidden 4096, GQA 32/8, MLP 14336, vocabulary 128,256) is written ONCE as a
sharded bf16 safetensors checkpoint (~16 GB, into ``--work``; reused by later runs). Then, each in a
fresh process whose own peak resident set (VmHWM) is the figure, one after another:

1. ``load-peftlab``: peftlab's streaming loader (``peftlab.model.quantized_load.load_quantized``): tensor by
   tensor, each linear quantised to NF4 (double quant) as it arrives;
2. ``load-transformers``: the usual path, ``AutoModelForCausalLM.from_pretrained(checkpoint,
   quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quant))`` — watched: a
   process that passes ``--max-rss-gb`` is killed and recorded as "over the limit" instead of taking
   the machine down (24 GB, no swap);
3. ``train``: ``peftlab train``'s Trainer on that checkpoint: NF4 base, LoRA r=16 on every linear
   layer, gradient checkpointing, bf16 compute, packed Alpaca rows (Llama-3 tokenizer) of
   ``--seq`` tokens, ``--steps`` optimizer steps of one micro-batch; step times from its
   metrics.jsonl and the planner's prediction (``peftlab estimate``) for the same recipe.

    python -P bench/scale.py                       # the full run (~16 GB disk in --work, tens of minutes)
    python -P bench/scale.py --smoke --results-dir /tmp/r   # tiny config, seconds

Results: a table on stdout and one JSON line per phase in ``bench/results/scale.jsonl``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import append_jsonl, print_table, watch

SHARED = HERE.parents[1] / "shared" / "data"
GB = 1e9
MARK = "__SCALE_RESULT__"
RESULTS_NAME = "scale"

SMOKE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
                "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


# ---- helpers shared with bench_estimate.py -------------------------------------------------------


def run_watched(args: list[str], *, max_rss_gb: float, timeout: float = 7200.0,
                env: dict[str, str] | None = None, results: int = 1) -> Any:
    """Run ``python -P <args>`` under :func:`common.watch` and return the JSON it printed after ``MARK``
    (its own peak RSS, VmHWM, among it) plus the sampled RSS / anonymous maxima. A child killed for
    passing ``max_rss_gb`` of anonymous memory comes back as ``over_limit`` with the sampled figures
    (lower bounds). ``results`` > 1: the child runs that many phases, the last ``results`` MARK lines
    come back as a list (each with the same sampled figures; over the limit: one entry per phase)."""
    import threading

    proc = subprocess.Popen([sys.executable, "-P", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, acc=acc: acc.extend(s), daemon=True)
               for s, acc in ((proc.stdout, out), (proc.stderr, err))]
    for r in readers:
        r.start()
    t0 = time.perf_counter()
    w = watch(proc, max_rss_gb=max_rss_gb, timeout_s=timeout)
    for r in readers:
        r.join()
    sampled = {"sampled_rss_gb": w["sampled_rss_gb"] * 2**30 / GB, "sampled_anon_gb": w["sampled_anon_gb"] * 2**30 / GB,
               "wall_s": time.perf_counter() - t0}
    if w["status"].startswith("exceeded"):
        over = {"over_limit": True, "peak_rss_gb": sampled["sampled_rss_gb"], **sampled}
        return over if results == 1 else [dict(over) for _ in range(results)]
    if w["status"] != "ok":
        raise RuntimeError(f"phase {args[:3]}: {w['status']}")
    lines = [ln for ln in out if ln.startswith(MARK)][-results:]
    if proc.returncode != 0 or len(lines) < results:
        raise RuntimeError(f"phase {args[:3]} failed (rc={proc.returncode}):\n{''.join(err)[-4000:]}")
    found = [{**json.loads(line[len(MARK):]), **sampled} for line in lines]
    return found[0] if results == 1 else found


def report(result: dict[str, Any]) -> None:
    """Child side: add this process's peak RSS and print the result line for :func:`run_watched`."""
    from peftlab.engine.planner import peak_rss_bytes

    result["peak_rss_gb"] = peak_rss_bytes() / GB
    print(MARK + json.dumps(result, default=str), flush=True)


def ensure_checkpoint(config: dict[str, Any], work: Path, *, tokenizer: str | None, seed: int = 0) -> Path:
    """The bf16 random checkpoint of ``config`` under ``work`` (written once, reused while the config
    and seed are the same), with a tokenizer beside it."""
    key = hashlib.sha256(json.dumps([config, seed, tokenizer], sort_keys=True).encode()).hexdigest()[:12]
    ckpt = work / f"ckpt-{config.get('model_type', 'model')}-{key}"
    if (ckpt / "DONE").is_file():
        return ckpt
    import torch

    from peftlab.model.quantized_load import save_random_checkpoint

    cfg_dir = work / f"config-{key}"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    save_random_checkpoint(cfg_dir, ckpt, dtype=torch.bfloat16, seed=seed, max_shard_size=2 << 30)
    if tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(ckpt)
    else:
        from peftlab.model.builtin import build_tokenizer

        build_tokenizer().save_pretrained(ckpt)
    print(f"wrote {ckpt} in {time.perf_counter() - t0:.0f} s", flush=True)
    (ckpt / "DONE").write_text("ok")
    return ckpt


def alpaca_rows(n: int) -> list[dict[str, str]]:
    """Alpaca rows from ../shared/data (the 1k file), else generated instruction rows."""
    src = SHARED / "datasets" / "alpaca" / "alpaca_data_1k.json"
    if src.is_file():
        return json.loads(src.read_text())[:n]
    words = ["the", "model", "reads", "a", "short", "instruction", "and", "writes", "a", "helpful", "answer", "about", "it"]
    return [{"instruction": f"Write sentence {i} about {words[i % len(words)]}.", "input": "",
             "output": " ".join(words[(i + j) % len(words)] for j in range(12 + i % 20))} for i in range(n)]


def recipe_dict(ckpt: Path, work: Path, *, seq: int, steps: int, dtype: str, checkpointing: bool = True,
                micro_batch: int = 1, r: int = 16, kernels: str = "auto", host_allocator: str = "default") -> dict[str, Any]:
    data = work / "alpaca.json"
    if not data.is_file():
        data.write_text(json.dumps(alpaca_rows(1000)))
    return {
        "model": {"name": str(ckpt), "dtype": dtype, "gradient_checkpointing": checkpointing,
                  "attn_implementation": "sdpa"},
        "quantization": {"mode": "nf4", "double_quant": True},
        "adapter": {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(data), "format": "alpaca"}], "template": "llama3", "max_seq_len": seq,
                 "packing": True, "overlength": "truncate"},
        "train": {"max_steps": steps, "micro_batch_size": micro_batch, "grad_accum": 1, "lr": 2e-4,
                  "warmup_steps": 0, "log_every": 1, "eval_at_start": False, "device": "cpu", "seed": 0,
                  "host_allocator": host_allocator},
        "eval": {"metric": "loss"},
        "output": {"dir": str(work / "run"), "report_to": ["jsonl"], "plot": False, "overwrite": True},
        "kernels": kernels,
    }


# ---- the phases (each runs in its own process) ---------------------------------------------------


def phase_load_peftlab(ns: argparse.Namespace) -> None:
    import torch

    from peftlab.model.quantized_load import QuantSettings, load_quantized

    t0 = time.perf_counter()
    m = load_quantized(ns.ckpt, QuantSettings(compute_dtype=getattr(torch, ns.dtype)))
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
    report({"phase": "load-peftlab", "load_s": time.perf_counter() - t0, "model_gb": nbytes / GB})


def phase_load_transformers(ns: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, ns.dtype)
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(
        ns.ckpt, dtype=dtype, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
    report({"phase": "load-transformers", "load_s": time.perf_counter() - t0, "model_gb": nbytes / GB})


def phase_train(ns: argparse.Namespace) -> None:
    import torch

    from peftlab.recipe.parse import recipe_from_dict
    from peftlab.trainer.loop import Trainer

    raw = json.loads(ns.recipe)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    t0 = time.perf_counter()
    trainer = Trainer(recipe_from_dict(raw), quiet=True)
    load_s = time.perf_counter() - t0
    trainer.train()
    rows = [json.loads(x) for x in (Path(raw["output"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("split") == "train"]
    report({"phase": "train", "load_s": load_s, "threads": torch.get_num_threads(),
            "steps": [{"step": r["step"], "loss": r.get("loss"), "tokens": r.get("tokens"),
                       "tokens_per_s": r.get("tokens_per_s")} for r in steps]})


PHASES = {"load-peftlab": phase_load_peftlab, "load-transformers": phase_load_transformers, "train": phase_train}


# ---- the driver ----------------------------------------------------------------------------------


def measure_train(ckpt: Path, work: Path, *, seq: int, steps: int, dtype: str, threads: int, max_rss_gb: float,
                  **recipe_kw: Any) -> dict[str, Any]:
    """One training run in its own process + the planner's prediction for the same recipe."""
    from peftlab.engine.planner import estimate
    from peftlab.recipe.parse import recipe_from_dict

    raw = recipe_dict(ckpt, work, seq=seq, steps=steps, dtype=dtype, **recipe_kw)
    est = estimate(recipe_from_dict(raw), device="cpu")
    res = run_watched([__file__, "--phase", "train", "--recipe", json.dumps(raw), "--threads", str(threads)],
                      max_rss_gb=max_rss_gb)
    res["predicted_gb"] = est.total / GB
    res["predicted"] = {k: v / GB for k, v in est.components.items()}
    if not res.get("over_limit"):
        res["prediction_error"] = res["predicted_gb"] / res["peak_rss_gb"] - 1
        timed = [s for s in res["steps"][1:] if s.get("tokens_per_s")] or res["steps"]
        tps = sorted(s["tokens_per_s"] for s in timed)
        res["tokens_per_s"] = tps[len(tps) // 2]
        res["step_s"] = seq * recipe_kw.get("micro_batch", 1) / res["tokens_per_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(SHARED / "configs" / "llama-3.1-8b"),
                    help="model directory or config.json of the architecture (default: Llama-3.1-8B)")
    ap.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers")
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "llama3-8b-instruct"))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", default=None, help="where the 16-bit checkpoint lives (default: $TMPDIR/peftlab-scale)")
    ap.add_argument("--max-rss-gb", type=float, default=20.0)
    ap.add_argument("--host-allocator", default="bounded", choices=["bounded", "default"],
                    help="train.host_allocator of the training run (bounded: peak RSS = live tensors)")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(PHASES), help="phases to leave out")
    ap.add_argument("--smoke", action="store_true", help="tiny config, 1 step: checks the script runs")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--phase", nargs="+", choices=list(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.phase:
        for phase in ns.phase:  # more than one: smoke runs, one after another in this process
            PHASES[phase](ns)
        return 0

    if ns.smoke:
        config, tokenizer, ns.seq, ns.steps = dict(SMOKE_CONFIG), None, 64, 2
        work = Path(tempfile.mkdtemp(prefix="peftlab-scale-smoke-"))
    else:
        cfg_path = Path(ns.config)
        cfg_path = cfg_path / "config.json" if cfg_path.is_dir() else cfg_path
        if not cfg_path.is_file():
            print(f"scale: no config at {ns.config} (../shared/data absent?); pass --config", file=sys.stderr)
            return 2
        config = json.loads(cfg_path.read_text())
        tokenizer = ns.tokenizer if Path(ns.tokenizer).is_dir() else None
        work = Path(ns.work or Path(tempfile.gettempdir()) / "peftlab-scale")
    if ns.layers:
        config["num_hidden_layers"] = ns.layers
    work.mkdir(parents=True, exist_ok=True)
    ckpt = ensure_checkpoint(config, work, tokenizer=tokenizer)
    ckpt_gb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / GB
    rows = []
    common = {"config": Path(ns.config).name if not ns.smoke else "smoke", "layers": config["num_hidden_layers"],
              "checkpoint_gb": ckpt_gb, "dtype": ns.dtype, "smoke": ns.smoke, "max_rss_gb": ns.max_rss_gb}
    loads = [phase for phase in ("load-peftlab", "load-transformers") if phase not in ns.skip]
    # Smoke runs load both ways in one process (each fresh interpreter costs more than a tiny model's load; the
    # second's peak RSS then includes the first's). Full runs: a fresh process each, its peak its own.
    for group in [loads] if ns.smoke and loads else [[phase] for phase in loads]:
        print(f"== {' + '.join(group)}", flush=True)
        found = run_watched([__file__, "--phase", *group, "--ckpt", str(ckpt), "--dtype", ns.dtype],
                            max_rss_gb=ns.max_rss_gb, results=len(group))
        for phase, res in zip(group, found if len(group) > 1 else [found]):
            rows.append({**common, **res, "phase": phase})
            append_jsonl(RESULTS_NAME, rows[-1], ns.results_dir)
    if "train" not in ns.skip:
        print(f"== train: seq {ns.seq}, {ns.steps} steps, {ns.threads} threads", flush=True)
        res = measure_train(ckpt, work, seq=ns.seq, steps=ns.steps, dtype=ns.dtype, threads=ns.threads,
                            max_rss_gb=ns.max_rss_gb, host_allocator=ns.host_allocator)
        rows.append({**common, **res, "phase": "train", "seq": ns.seq, "lora_r": 16,
                     "gradient_checkpointing": True, "host_allocator": ns.host_allocator})
        append_jsonl(RESULTS_NAME, rows[-1], ns.results_dir)
    print(f"\ncheckpoint: {ckpt} ({ckpt_gb:.2f} GB bf16, {config['num_hidden_layers']} layers)")
    print_table(rows, ["phase", "peak_rss_gb", "sampled_anon_gb", "over_limit", "load_s", "model_gb", "step_s", "tokens_per_s",
                      "predicted_gb", "prediction_error", "wall_s"])
    if ns.smoke:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
