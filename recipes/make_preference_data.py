#!/usr/bin/env python3
"""Generate preference data with a checkable preference on the quickstart task's prompts.

Every conversation of the quickstart task (recipes/make_quickstart_data.py: single-digit arithmetic, the letter
after / before a letter, first / last / count / largest of a short list) becomes a pair: its prompt, a chosen and a
rejected answer. Two preferences (``--preference``):

- ``style`` (default, what recipes/dpo-quickstart.yaml and kto-quickstart.yaml train): chosen = the answer
  ended with a full stop (``7.``), rejected = the bare answer (``7``), the style the SFT quickstart's model answers
  in. Unlike correctness, a style is something the tiny model can learn and carry to prompts it has not seen:
  held-out ``rewards/accuracies`` goes to 1.0 and greedy answers move to the chosen style. Count that with
  ``python recipes/preference_style.py RECIPE [--before]`` (the share of held-out greedy answers in the chosen
  style, exact match against the chosen answers, and whether the value is still right). The two answers share
  the value and part where the SFT model ends its turn; longer styles (``The answer is 7.``, ``7 is the
  answer.``) were measured: DPO then lowers the rejected answer without raising the chosen one (runs of 20-80
  steps: held-out greedy answers turn to noise, chosen log-probs stay ~-45 to -70).
- ``correct`` (the hard variant): chosen = the right answer, rejected = a wrong one. ``--rejected copied``
  (default): a wrong answer copied from the question — an operand of the sum, the letter asked about, another
  item of the list — the mistake the small SFT model makes most; ``--rejected near``: a number off by 1 or 2, a
  neighbouring letter. Telling them apart needs the arithmetic itself, which builtin:tiny-llama cannot do (SFT
  exact match ~0.19): DPO from the SFT adapter ends at held-out ``rewards/accuracies`` ~0.65 and its greedy
  answers get worse.

Eval prompts are disjoint from train prompts (the quickstart's split). Two files per split:

- ``pairs``: TRL's conversational pairs ``{"prompt": [user turn], "chosen": [assistant turn], "rejected":
  [assistant turn]}`` (DPO, IPO, robust, ORPO, SimPO);
- ``kto``: TRL's unpaired rows ``{"prompt": [user turn], "completion": [assistant turn], "label": bool}``, one
  row per prompt, its chosen answer (label true) or its rejected one (false) with equal probability.

The eval split is written as pairs in both folders: a KTO run reads each pair as a desirable and an undesirable
completion and reports how often the chosen answer gets the higher reward (``eval_rewards/accuracies``).

    python recipes/make_preference_data.py --out recipes/data [--train 3000 --eval 200 --preference style]
    python recipes/make_preference_data.py --preference correct [--rejected copied|near]
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


STYLE_SUFFIX = "."  # the chosen style of --preference style (the rejected one is the bare answer)


def styled(answer: str) -> str:
    """The quickstart answer in the chosen style of ``--preference style``: ``7`` -> ``7.``"""
    return f"{answer}{STYLE_SUFFIX}"


PREFERENCES = ("style", "correct")


def to_pair(ex: dict, rng: random.Random, kind: str = "copied", preference: str = "style") -> dict:
    """A quickstart conversation as a pair: ``style``: the answer with a full stop chosen over the bare answer;
    ``correct``: the right answer chosen over a wrong one of ``kind`` (see REJECTED)."""
    user, assistant = ex["messages"]
    answer = assistant["content"]
    if preference == "style":
        chosen, rejected = styled(answer), answer
    elif preference == "correct":
        chosen, rejected = answer, wrong_answer(ex["task"], user["content"], answer, rng, kind)
    else:
        raise ValueError(f"preference must be one of {PREFERENCES}, not {preference!r}")
    return {"task": ex["task"], "prompt": [user], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def to_kto(ex: dict, rng: random.Random, kind: str = "copied", preference: str = "style") -> dict:
    pair = to_pair(ex, rng, kind, preference)
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
                    help="with --preference correct: copied: a wrong answer copied from the question (default); "
                         "near: next to the right one")
    ap.add_argument("--preference", choices=PREFERENCES, default="style",
                    help="style: '7.' chosen over '7' (default, the quickstarts' data); correct: the "
                         "right answer chosen over a wrong one (hard for the tiny model)")
    args = ap.parse_args(argv)
    train, held_out = generate(args.train, args.eval, args.seed)
    rng = random.Random(args.seed + 1)
    kinds = (args.rejected, args.preference)
    eval_pairs = [to_pair(ex, rng, *kinds) for ex in held_out]
    write_jsonl([to_pair(ex, rng, *kinds) for ex in train], args.out / "preference" / "train.jsonl")
    write_jsonl(eval_pairs, args.out / "preference" / "eval.jsonl")
    write_jsonl([to_kto(ex, rng, *kinds) for ex in train], args.out / "kto" / "train.jsonl")
    write_jsonl(eval_pairs, args.out / "kto" / "eval.jsonl")
    print(f"wrote {len(train)} train and {len(held_out)} eval rows ({args.preference} preference) to "
          f"{args.out}/preference (pairs) and {args.out}/kto (unpaired; eval as pairs)")


if __name__ == "__main__":
    main()
