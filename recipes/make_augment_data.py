"""Generate the augmentation quickstart task: topic classification, trained on clean text, judged on noisy text.

The texts are those of the classification quickstart (a few filler words and one topic word: weather / food /
sport; chance = 1/3). ``train.jsonl`` is clean. ``eval_noisy.jsonl`` is what users type: every word has a typo
with probability 0.35 (a keyboard neighbour, a dropped letter or two swapped letters; the topic word is always
one of them: the noise hits the words that matter) and filler words go missing with probability 0.15.
``eval_clean.jsonl`` holds the same eval texts without noise. The noise here is written independently of
peftlab's augmentation (dropped and swapped letters are noise augmentation never makes).

    python recipes/make_augment_data.py recipes/data/augment   # train.jsonl, eval_noisy.jsonl, eval_clean.jsonl
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
KEYS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def near_key(c: str, rng: random.Random) -> str:
    """A key next to ``c`` on the same keyboard row."""
    row = next((r for r in KEYS if c in r), None)
    if row is None:
        return c
    k = row.index(c)
    return rng.choice([row[j] for j in (k - 1, k + 1) if 0 <= j < len(row)])


def misspell(word: str, rng: random.Random) -> str:
    """One typo that changes the word (swapping two equal letters would not)."""
    for _ in range(20):
        new = one_typo(word, rng)
        if new != word:
            return new
    return word


def one_typo(word: str, rng: random.Random) -> str:
    if len(word) < 2:
        return near_key(word, rng)
    k = rng.randrange(len(word))
    kind = rng.choice(["key", "drop", "swap"])
    if kind == "key":
        return word[:k] + near_key(word[k], rng) + word[k + 1:]
    if kind == "drop" and len(word) > 2:
        return word[:k] + word[k + 1:]
    k = min(k, len(word) - 2)
    return word[:k] + word[k + 1] + word[k] + word[k + 2:]


def noisy(words: list[str], topic_word: str, rng: random.Random) -> list[str]:
    out = []
    for w in words:
        if w != topic_word and rng.random() < 0.15:
            continue
        out.append(misspell(w, rng) if w == topic_word or rng.random() < 0.35 else w)
    return out


def generate(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(seed)
    train, clean, noise = [], [], []
    for k in range(n_train + n_eval):
        topic = rng.choice(sorted(TOPICS))
        word = rng.choice(TOPICS[topic])
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
        words.insert(rng.randint(0, len(words)), word)
        if k < n_train:
            train.append({"text": " ".join(words), "label": topic})
        else:
            clean.append({"text": " ".join(words), "label": topic})
            noise.append({"text": " ".join(noisy(words, word, rng)), "label": topic})
    return train, clean, noise


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/data/augment")
    train, clean, noise = generate(512, 600, seed=0)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(clean, out / "eval_clean.jsonl")
    write_jsonl(noise, out / "eval_noisy.jsonl")
    print(f"wrote {len(train)} clean train rows and {len(noise)} eval rows (noisy and clean) to {out}")
