"""Generate the DANN quickstart task: the classification quickstart's topics (weather / food / sport) in two
vocabularies — a labelled source domain and an unlabelled target domain.

Every text is a few filler words, ONE topic word and ONE cue word at random positions:

- topic words name the topic in both domains, but from different sets: the source uses rain, bread, ball, ...;
  the target storm, cheese, tennis, ... — words the source data never show;
- cue words (umbrella, kitchen, stadium, ...) are shared by both domains; in the source they name the topic in
  60 % of the texts (a random other topic otherwise), in the target they always do (``CUE_MATCH``).

A source-only model fits the source topic words (perfect on source) and leans little on the loose cues, so on the
target — whose topic words it never saw — it is often wrong. DANN's domain classifier tells the domains apart by
the domain-specific topic words; reversing its gradient pushes the features away from them and towards the shared
cues, which carry over (a reader of the cues alone is right on every target text).

    python recipes/make_dann_data.py recipes/data/dann
    # -> source_train.jsonl, source_eval.jsonl (labelled), target_train.jsonl (no labels), target_eval.jsonl
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SOURCE_WORDS = {
    "weather": ["rain", "snow", "wind", "hail"],
    "food": ["bread", "soup", "rice", "cake"],
    "sport": ["ball", "goal", "race", "swim"],
}
TARGET_WORDS = {
    "weather": ["storm", "fog", "frost", "cloud"],
    "food": ["cheese", "apple", "honey", "pasta"],
    "sport": ["tennis", "golf", "hockey", "rugby"],
}
CUES = {
    "weather": ["umbrella", "forecast"],
    "food": ["kitchen", "dinner"],
    "sport": ["stadium", "coach"],
}
CUE_MATCH = {"source": 0.6, "target": 1.0}
FILLER = ["the", "a", "we", "saw", "very", "much", "today", "and", "then", "it", "was", "all", "of", "my"]


def generate(n: int, seed: int, *, domain: str, labelled: bool = True) -> list[dict]:
    """``n`` texts of ``domain`` ("source" | "target"); ``labelled``: with the topic as ``label``."""
    rng = random.Random(f"{seed}:{domain}")
    words = SOURCE_WORDS if domain == "source" else TARGET_WORDS
    topics = sorted(words)
    rows = []
    for _ in range(n):
        topic = rng.choice(topics)
        match = rng.random() < CUE_MATCH[domain]
        cue_topic = topic if match else rng.choice([t for t in topics if t != topic])
        text = [rng.choice(FILLER) for _ in range(rng.randint(2, 4))]
        for word in (rng.choice(words[topic]), rng.choice(CUES[cue_topic])):
            text.insert(rng.randint(0, len(text)), word)
        rows.append({"text": " ".join(text), "label": topic} if labelled else {"text": " ".join(text)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_all(out: Path, *, n_train: int = 512, n_eval: int = 128, seed: int = 0) -> Path:
    write_jsonl(generate(n_train, seed, domain="source"), out / "source_train.jsonl")
    write_jsonl(generate(n_eval, seed + 1, domain="source"), out / "source_eval.jsonl")
    write_jsonl(generate(n_train, seed + 2, domain="target", labelled=False), out / "target_train.jsonl")
    write_jsonl(generate(n_eval, seed + 3, domain="target"), out / "target_eval.jsonl")
    return out


if __name__ == "__main__":
    out = write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/data/dann"))
    print(f"wrote source_train/source_eval/target_train/target_eval .jsonl to {out}")
