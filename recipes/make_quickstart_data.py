#!/usr/bin/env python3
"""Generate the quickstart task: short instructions with checkable answers.

Deterministic for a seed. Writes chat-format JSONL ({"messages": [...]}, one conversation a line) for
train and a held-out eval split whose exact-match accuracy is the quickstart's metric. Tasks are
small enough for a 3M-parameter model to learn in about a minute on a CPU, varied enough that the
metric moves visibly: single-digit arithmetic, reversing/sorting short lists, the largest item, and
the next letter of the alphabet.

    python recipes/make_quickstart_data.py --out recipes/data/quickstart [--train 4000 --eval 200]
"""
from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path


def _digits(rng: random.Random, n_min: int = 3, n_max: int = 5) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(n_min, n_max))]


def make_example(rng: random.Random) -> dict:
    kind = rng.choice(["add", "sub", "reverse", "sort", "max", "next_letter"])
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        q, a_ = f"What is {a} + {b}?", str(a + b)
    elif kind == "sub":
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        q, a_ = f"What is {a} - {b}?", str(a - b)
    elif kind == "reverse":
        xs = _digits(rng)
        q, a_ = f"Reverse: {' '.join(map(str, xs))}", " ".join(map(str, reversed(xs)))
    elif kind == "sort":
        xs = _digits(rng)
        q, a_ = f"Sort: {' '.join(map(str, xs))}", " ".join(map(str, sorted(xs)))
    elif kind == "max":
        xs = _digits(rng)
        q, a_ = f"Largest of: {' '.join(map(str, xs))}", str(max(xs))
    else:
        c = rng.choice(string.ascii_lowercase[:-1])
        q, a_ = f"Letter after {c}?", chr(ord(c) + 1)
    return {"task": kind, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a_}]}


def generate(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    train: list[dict] = []
    held_out: list[dict] = []
    # Eval prompts are disjoint from train prompts, so exact match measures generalisation.
    while len(held_out) < n_eval:
        ex = make_example(rng)
        key = ex["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            held_out.append(ex)
    while len(train) < n_train:
        ex = make_example(rng)
        if ex["messages"][0]["content"] in seen and ex["task"] not in ("add", "sub", "next_letter"):
            continue
        train.append(ex)
    return train, held_out


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "quickstart")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    train, held_out = generate(args.train, args.eval, args.seed)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(held_out, args.out / "eval.jsonl")
    print(f"wrote {len(train)} train and {len(held_out)} eval conversations to {args.out}")


if __name__ == "__main__":
    main()
