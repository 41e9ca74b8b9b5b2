#!/usr/bin/env python3
"""Generate the quickstart task: short instructions with checkable answers.

Deterministic for a seed. Writes chat-format JSONL ({"messages": [...]}, one conversation a line) for
train and a held-out eval split whose exact-match accuracy is the quickstart's metric. The tasks are
the skills the built-in base model saw as raw text in its pre-training (``3 + 4 = 7``,
``after c comes d``, ``first(k z m) = k``, ... — see ``peftlab/builtin.py``), asked here as chat
instructions it has never seen: single-digit addition and subtraction, the letter after / before a
letter, and the first item, last item, number of items and largest digit of a short list. The
fine-tuning teaches the model to follow the instructions; the eval measures it on prompts that are
not in the training set.

Held out: every eval prompt is absent from train. Tasks with a small prompt space (100 additions,
55 subtractions, 25 + 25 letter questions) set a fixed ~20% of their prompts aside for eval and
train only on the rest; list tasks draw eval prompts first and train rejects them.

    python recipes/make_quickstart_data.py --out recipes/data/quickstart [--train 3000 --eval 200]
"""
from __future__ import annotations

import argparse
import json
import random
from itertools import pairwise
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASKS = ("add", "sub", "next_letter", "prev_letter", "first", "last", "count", "max")
HELD_OUT_FRACTION = 0.2


def _qa(task: str, q: str, a: str) -> dict:
    return {"task": task, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def small_space(task: str) -> list[dict]:
    """Every example of a task whose prompt space is small enough to enumerate (else [])."""
    if task == "add":
        return [_qa(task, f"What is {a} + {b}?", str(a + b)) for a in range(10) for b in range(10)]
    if task == "sub":
        return [_qa(task, f"What is {a} - {b}?", str(a - b)) for a in range(10) for b in range(a + 1)]
    if task == "next_letter":
        return [_qa(task, f"Letter after {c}?", n) for c, n in pairwise(LETTERS)]
    if task == "prev_letter":
        return [_qa(task, f"Letter before {n}?", c) for c, n in pairwise(LETTERS)]
    return []


def list_example(task: str, rng: random.Random) -> dict:
    n = rng.randint(2, 5)
    if task == "max":
        xs = [rng.choice("0123456789") for _ in range(n)]
        return _qa(task, f"Largest of: {' '.join(xs)}", max(xs))
    xs = [rng.choice(LETTERS) for _ in range(n)]
    s = " ".join(xs)
    if task == "first":
        return _qa(task, f"First item: {s}", xs[0])
    if task == "last":
        return _qa(task, f"Last item: {s}", xs[-1])
    if task == "count":
        return _qa(task, f"How many items: {s}", str(n))
    raise ValueError(task)


def generate(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    pools_train: dict[str, list[dict]] = {}
    pools_eval: dict[str, list[dict]] = {}
    for task in TASKS:
        space = small_space(task)
        if space:
            rng.shuffle(space)
            k = max(1, round(HELD_OUT_FRACTION * len(space)))
            pools_eval[task], pools_train[task] = space[:k], space[k:]

    seen: set[str] = set()
    held_out: list[dict] = []
    # Eval prompts are disjoint from train prompts, so exact match measures generalisation.
    while len(held_out) < n_eval:
        task = rng.choice(TASKS)
        if task in pools_eval:
            if not pools_eval[task]:  # its held-out share is used up
                continue
            ex = pools_eval[task].pop()
        else:
            ex = list_example(task, rng)
        key = ex["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            held_out.append(ex)
    train: list[dict] = []
    while len(train) < n_train:
        task = rng.choice(TASKS)
        ex = rng.choice(pools_train[task]) if task in pools_train else list_example(task, rng)
        if ex["messages"][0]["content"] in seen:
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
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    train, held_out = generate(args.train, args.eval, args.seed)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(held_out, args.out / "eval.jsonl")
    print(f"wrote {len(train)} train and {len(held_out)} eval conversations to {args.out}")


if __name__ == "__main__":
    main()
