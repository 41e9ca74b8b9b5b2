"""Generate the classification quickstart task: which topic does a short text talk about?

Each text is a few filler words with one topic word at a random position; the label is the topic
(``weather`` / ``food`` / ``sport``). A model must find the topic word wherever it is — chance is 1/3.
``--regression`` instead writes how many topic words a text holds (0-3) as a number label.

    python recipes/make_classify_data.py recipes/data/classify   # train.jsonl + eval.jsonl
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TOPICS = {
    "weather": ["rain", "snow", "sun", "wind", "storm", "fog"],
    "food": ["bread", "soup", "rice", "cake", "apple", "cheese"],
    "sport": ["ball", "goal", "race", "swim", "tennis", "golf"],
}
FILLER = ["the", "a", "we", "saw", "very", "much", "today", "and", "then", "it", "was", "all", "of", "my"]


def generate(n_train: int, n_eval: int, seed: int, *, regression: bool = False) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    rows = []
    topics = sorted(TOPICS)
    for _ in range(n_train + n_eval):
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
        if regression:
            k = rng.randint(0, 3)
            for _ in range(k):
                words.insert(rng.randint(0, len(words)), rng.choice(TOPICS["food"]))
            rows.append({"text": " ".join(words), "label": float(k)})
            continue
        topic = rng.choice(topics)
        words.insert(rng.randint(0, len(words)), rng.choice(TOPICS[topic]))
        rows.append({"text": " ".join(words), "label": topic})
    return rows[:n_train], rows[n_train:]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/data/classify")
    train, held = generate(512, 128, seed=0, regression="--regression" in sys.argv)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(held, out / "eval.jsonl")
    print(f"wrote {len(train)} train and {len(held)} eval rows to {out}")
