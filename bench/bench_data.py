"""Data pipeline benchmark: padding waste without packing, packing efficiency with it, and
tokenization throughput (render with the chat template + tokenize + mask), on the Alpaca samples in
../shared/data with the Llama 3 tokenizer.

    .venv/bin/python bench/bench_data.py                 # full: alpaca dir, Llama 3, 2048 and 4096
    .venv/bin/python bench/bench_data.py --smoke         # < 15 s; built-in tokenizer + generated rows
                                                         # when ../shared/data is absent

Padding waste is the fraction of token slots that are padding: "fixed" pads every sample to
max_seq_len, "dynamic" pads each micro-batch of --batch-size consecutive (shuffled) samples to its
longest. Packing efficiency is the fraction of slots holding real tokens when samples are packed
best-fit-decreasing into rows of max_seq_len. Throughput is measured on a cold build (no cache).
Prints a table and appends one JSON line per setting to bench/results/bench_data.jsonl.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, print_table

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def generated_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca-shaped rows with a long-tailed length distribution (for --smoke without shared data)."""
    g = random.Random(seed)
    words = ["the", "a", "model", "data", "train", "token", "loss", "batch", "pack", "sample", "attention", "layer", "weight"]

    def text(mu: float) -> str:
        return " ".join(g.choice(words) for _ in range(max(1, int(g.lognormvariate(mu, 0.8)))))

    return [{"instruction": text(2.5), "input": text(1.5) if g.random() < 0.4 else "", "output": text(4.0)}
            for _ in range(n)]


def run(data_path: str, tokenizer: Any, max_seq_len: int, batch_size: int, max_samples: int | None) -> dict:
    from peftlab.data.config import DataConfig
    from peftlab.data.pipeline import build_data

    cfg = DataConfig(train=[{"path": data_path, "format": "alpaca"}], max_seq_len=max_seq_len,
                     max_samples=max_samples)
    build_data(cfg.model_copy(update={"max_samples": 16}), tokenizer, seed=0)  # warm-up: template compile
    t0 = time.perf_counter()
    plain = build_data(cfg, tokenizer, seed=0)
    seconds = time.perf_counter() - t0
    plain.stats.padding_batch_size = batch_size
    from peftlab.data.stats import padding_waste

    lengths = [len(e["input_ids"]) for e in plain.train]
    t1 = time.perf_counter()
    packed = build_data(cfg.model_copy(update={"packing": True}), tokenizer, seed=0)
    pack_seconds = time.perf_counter() - t1
    s = plain.stats
    return {
        "max_seq_len": max_seq_len,
        "samples": s.train_samples,
        "tokens": s.train_tokens,
        "trained_tokens": s.train_trained_tokens,
        "truncated": s.truncated,
        "padding_waste_fixed": s.padding_waste_fixed,
        "padding_waste_dynamic": padding_waste(lengths, batch_size),
        "batch_size": batch_size,
        "packs": packed.stats.packs,
        "packing_efficiency": packed.stats.packing_efficiency,
        "build_seconds": seconds,
        "build_seconds_with_packing": pack_seconds,
        "rows_per_s": s.train_samples / seconds,
        "tokens_per_s": s.train_tokens / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny and fast (< 15 s); never needs shared data")
    ap.add_argument("--data", default=str(SHARED / "datasets" / "alpaca"))
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "llama3-8b-instruct"))
    ap.add_argument("--max-seq-len", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--batch-size", type=int, default=8, help="micro-batch for dynamic padding waste")
    ap.add_argument("--results-dir", default=None, help="where bench_data.jsonl goes (default bench/results)")
    args = ap.parse_args(argv)

    max_samples = None
    source = "shared"
    with tempfile.TemporaryDirectory() as tmp:
        data_path, tok_name = args.data, args.tokenizer
        if args.smoke:
            args.max_seq_len = [512, 1024]
            max_samples = 300
        if not Path(data_path).exists() or not Path(tok_name).exists():
            if not args.smoke:
                print(f"shared data not found ({data_path}, {tok_name}); use --smoke", file=sys.stderr)
                return 2
            source = "generated"
            data_path = str(Path(tmp) / "generated.json")
            Path(data_path).write_text(json.dumps(generated_rows(max_samples or 300)))
        if source == "generated":
            from peftlab.model.builtin import build_tokenizer

            tokenizer, tok_label = build_tokenizer(), "builtin:byte"
        else:
            from transformers import AutoTokenizer

            tokenizer, tok_label = AutoTokenizer.from_pretrained(tok_name), Path(tok_name).name
        rows = []
        for n in args.max_seq_len:
            r = run(data_path, tokenizer, n, args.batch_size, max_samples)
            r.update(tokenizer=tok_label, data=Path(args.data).name if source == "shared" else "generated",
                     smoke=args.smoke)
            rows.append(r)
            append_jsonl("bench_data", r, Path(args.results_dir) if args.results_dir else None)
    cols = ["max_seq_len", "samples", "tokens", "padding_waste_fixed", "padding_waste_dynamic", "packs",
            "packing_efficiency", "rows_per_s", "tokens_per_s"]
    print(f"data: {rows[0]['data']}  tokenizer: {rows[0]['tokenizer']}  batch for dynamic padding: "
          f"{args.batch_size}")
    print_table(rows, cols)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
