#!/usr/bin/env python3
"""Generate preference data with a checkable preference: the quickstart task's correct vs wrong answers.

Every conversation of the quickstart task (recipes/make_quickstart_data.py: single-digit arithmetic, the letter
after / before a letter, first / last / count / largest of a short list) gets a *wrong* answer beside its right
one. ``--rejected copied`` (default): a wrong answer copied from the question — an operand of the sum, the letter
asked about, another item of the list — the mistake the small SFT model makes most; ``--rejected near``: a
number off by 1 or 2, a neighbouring letter (hard: telling them apart needs the arithmetic itself). The
preference is checkable: the chosen answer is the correct one. Eval prompts are disjoint from train prompts (the
quickstart's split).

Two files per split:

- ``pairs``: TRL's conversational pairs ``{"prompt": [user turn], "chosen": [assistant turn], "rejected":
  [assistant turn]}`` (DPO, IPO, robust, ORPO, SimPO);
- ``kto``: TRL's unpaired rows ``{"prompt": [user turn], "completion": [assistant turn], "label": bool}``, one
  row per prompt, its right answer (label true) or a wrong one (false) with equal probability.

The eval split is written as pairs in both folders: a KTO run reads each pair as a desirable and an undesirable
completion and reports how often the right answer gets the higher reward (``eval_rewards/accuracies``).

    python recipes/make_preference_data.py --out recipes/data [--train 3000 --eval 200 --rejected copied]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_quickstart_data import LETTERS, generate, write_jsonl


def near_miss(task: str, question: str, answer: str, rng: random.Random) -> str:
    """A wrong answer next to the right one: a number off by 1 or 2, a neighbouring letter, another item."""
    if answer.lstrip("-").isdigit():
        candidates = [int(answer) + d for d in (-2, -1, 1, 2)]
        if task in ("max", "count"):
            candidates = [c for c in candidates if c >= 0]
        return str(rng.choice(candidates))
    if task in ("first", "last"):
        others = [x for x in question.split(":", 1)[1].split() if x != answer]
        if others:
            return rng.choice(others)
    k = LETTERS.index(answer)
    return rng.choice([LETTERS[j] for j in (k - 2, k - 1, k + 1, k + 2) if 0 <= j < len(LETTERS)])


def copied(task: str, question: str, answer: str, rng: random.Random) -> str:
    """A wrong answer copied from the question, the mistake a small model makes most: an operand of the sum, the
    letter asked about, another item of the list (an item instead of the count)."""
    if task in ("add", "sub"):
        pieces = question.removeprefix("What is ").rstrip("?").split()
        pool = [pieces[0], pieces[2]]
    elif task in ("next_letter", "prev_letter"):
        pool = [question.split()[-1].rstrip("?")]
    else:  # first / last / count / max: the items of the list
        pool = question.split(":", 1)[1].split()
    pool = [x for x in pool if x != answer]
    return rng.choice(pool) if pool else near_miss(task, question, answer, rng)


REJECTED = {"copied": copied, "near": near_miss}


def wrong_answer(task: str, question: str, answer: str, rng: random.Random, kind: str = "copied") -> str:
    """A wrong answer of the given ``kind`` (see REJECTED), never the right one."""
    bad = REJECTED[kind](task, question, answer, rng)
    assert bad != answer, (task, question)
    return bad


def to_pair(ex: dict, rng: random.Random, kind: str = "copied") -> dict:
    user, assistant = ex["messages"]
    bad = wrong_answer(ex["task"], user["content"], assistant["content"], rng, kind)
    return {"task": ex["task"], "prompt": [user], "chosen": [assistant],
            "rejected": [{"role": "assistant", "content": bad}]}


def to_kto(ex: dict, rng: random.Random, kind: str = "copied") -> dict:
    pair = to_pair(ex, rng, kind)
    good = rng.random() < 0.5
    return {"task": ex["task"], "prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"],
            "label": good}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--rejected", choices=sorted(REJECTED), default="copied",
                    help="copied: a wrong answer copied from the question (default); near: next to the right one")
    args = ap.parse_args(argv)
    train, held_out = generate(args.train, args.eval, args.seed)
    rng = random.Random(args.seed + 1)
    eval_pairs = [to_pair(ex, rng, args.rejected) for ex in held_out]
    write_jsonl([to_pair(ex, rng, args.rejected) for ex in train], args.out / "preference" / "train.jsonl")
    write_jsonl(eval_pairs, args.out / "preference" / "eval.jsonl")
    write_jsonl([to_kto(ex, rng, args.rejected) for ex in train], args.out / "kto" / "train.jsonl")
    write_jsonl(eval_pairs, args.out / "kto" / "eval.jsonl")
    print(f"wrote {len(train)} train and {len(held_out)} eval rows to {args.out}/preference (pairs) and "
          f"{args.out}/kto (unpaired; eval as pairs)")


if __name__ == "__main__":
    main()
