"""build_data end to end on small hand-written files with the built-in tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.builtin import build_tokenizer
from peftlab.data import DataConfig, build_data, collate

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Say {i}", "input": "", "output": f"{i} " * (1 + i % 5)} for i in range(n)]


def test_alpaca_and_messages_minimal_path(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))
    write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                     {"role": "assistant", "content": f"yo {i}"}]}
                                       for i in range(10)])
    cfg = DataConfig(train=["a.jsonl", "m.jsonl"], eval_split=0.2, max_seq_len=128)
    b = build_data(cfg, tok, seed=0, base_dir=tmp_path)
    assert b.dataset_names == ["a", "m"]
    assert len(b.train) == 24 and len(b.eval) == 6
    assert b.stats.eval_samples == 6
    ids = {e["sample_id"] for e in [*b.train, *b.eval]}
    assert len(ids) == 30  # unique across the mixture and the split
    for e in b.train:
        trained = [t for t in e["labels"] if t != IGNORE]
        assert trained and trained[-1] == tok.eos_token_id
        assert e["input_ids"][0] == tok.bos_token_id and e["input_ids"][1] != tok.bos_token_id
    batch = collate(b.train[:4], pad_token_id=b.pad_token_id)
    n = max(len(e["input_ids"]) for e in b.train[:4])
    assert batch["input_ids"].shape == (4, n)
    for r, e in enumerate(b.train[:4]):
        k = len(e["input_ids"])
        assert batch["attention_mask"][r].tolist() == [1] * k + [0] * (n - k)
        assert (batch["labels"][r, k:] == IGNORE).all()
        assert (batch["input_ids"][r, k:] == tok.pad_token_id).all()
    assert len(b.eval_prompts) == 6
    p = b.eval_prompts[0]
    assert tok.decode(p["prompt_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_same_seed_same_order_other_seed_other_order(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(50))
    cfg = DataConfig(train=[str(tmp_path / "a.jsonl")], eval_split=0.1)
    a = build_data(cfg, tok, seed=1)
    b = build_data(cfg, tok, seed=1)
    c = build_data(cfg, tok, seed=2)
    assert [e["sample_id"] for e in a.train] == [e["sample_id"] for e in b.train]
    assert [e["sample_id"] for e in a.train] != [e["sample_id"] for e in c.train]
