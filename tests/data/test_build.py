"""build_data end to end on small hand-written files with the built-in tokenizer."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from peftlab.builtin import build_tokenizer
from peftlab.data import DataConfig, build_data, collate, preview

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


def chat_rows(n: int, reply_len=lambda k: 1 + k % 7) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{k}"},
                          {"role": "assistant", "content": "a" * reply_len(k)}]} for k in range(n)]


def test_mixture_scale_and_proportional_and_loss_weights(tmp_path, tok):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    write_jsonl(tmp_path / "b.jsonl", chat_rows(30))
    specs = [{"path": "a.jsonl", "weight": 2.0, "loss_weight": 0.5}, {"path": "b.jsonl", "weight": 0.5}]
    b = build_data(DataConfig(train=specs), tok, seed=0, base_dir=tmp_path)
    per = [sum(1 for e in b.train if e["dataset"] == d) for d in (0, 1)]
    assert per == [20, 15]
    a_ids = [e["sample_id"] for e in b.train if e["dataset"] == 0]
    assert sorted(Counter(a_ids).values()) == [2] * 10  # weight 2: every row exactly twice
    assert {e["loss_weight"] for e in b.train if e["dataset"] == 0} == {0.5}
    assert [d.drawn for d in b.stats.datasets] == [20, 15]
    b = build_data(DataConfig(train=specs, mixture="proportional"), tok, seed=0, base_dir=tmp_path)
    assert [sum(1 for e in b.train if e["dataset"] == d) for d in (0, 1)] == [32, 8]  # 40 * 0.8 / 0.2
    batch = collate(b.train[:6], pad_token_id=b.pad_token_id)
    for r, e in enumerate(b.train[:6]):
        n = len(e["input_ids"])
        assert (batch["loss_weights"][r, :n] == e["loss_weight"]).all()
        assert (batch["loss_weights"][r, n:] == 0).all()


def test_overlength_truncate_drop_split(tmp_path, tok):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 50}, {"text": "y" * 10}])
    def run(mode):
        return build_data(DataConfig(train=["t.jsonl"], max_seq_len=20, overlength=mode, shuffle=False),
                          tok, seed=0, base_dir=tmp_path)
    t = run("truncate")
    assert [len(e["input_ids"]) for e in t.train] == [20, 12] and t.stats.truncated == 1
    d = run("drop")
    assert [len(e["input_ids"]) for e in d.train] == [12] and d.stats.dropped == 1
    s = run("split")
    assert [len(e["input_ids"]) for e in s.train] == [20, 20, 12, 12]  # 1 bos + 50 x + eos = 52
    assert s.stats.datasets[0].split_extra == 2
    assert [e["sample_id"] for e in s.train] == [0, 0, 0, 1]
    # a chat whose reply starts after max_seq_len has nothing left to train on: dropped and counted
    write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "u" * 40},
                                                     {"role": "assistant", "content": "a"}]}, *chat_rows(1)])
    c = build_data(DataConfig(train=["c.jsonl"], max_seq_len=32), tok, seed=0, base_dir=tmp_path)
    assert len(c.train) == 1 and c.stats.dropped == 1 and c.stats.truncated == 1


def test_packing_through_build_data(tmp_path, tok):
    write_jsonl(tmp_path / "c.jsonl", chat_rows(200, lambda k: 1 + (k * 37) % 90))
    cfg = DataConfig(train=["c.jsonl"], max_seq_len=256, packing=True)
    b = build_data(cfg, tok, seed=3, base_dir=tmp_path)
    assert sorted(s for p in b.train for s in p["sample_ids"]) == list(range(200))
    assert all(len(p["input_ids"]) <= 256 for p in b.train)
    assert b.stats.packs == len(b.train) and b.stats.packing_efficiency > 0.95
    assert b.stats.train_tokens == sum(len(p["input_ids"]) for p in b.train)
    from peftlab.data import format_stats

    text = format_stats(b.stats)
    assert "packing:" in text and f"{b.stats.packs} packs of 256" in text
    pv = preview(b, tok, n=1)
    assert "--- pack 0" in pv and "[[" in pv and "~~~ next sample ~~~" in pv


def test_stats_and_preview_unpacked(tmp_path, tok):
    write_jsonl(tmp_path / "c.jsonl", chat_rows(16))
    b = build_data(DataConfig(train=["c.jsonl"], max_seq_len=64, shuffle=False), tok, seed=0, base_dir=tmp_path)
    lengths = [len(e["input_ids"]) for e in b.train]
    assert b.stats.padding_waste_fixed == pytest.approx(1 - sum(lengths) / (16 * 64))
    dyn = 1 - sum(lengths) / (max(lengths[:8]) * 8 + max(lengths[8:]) * 8)
    assert b.stats.padding_waste_dynamic == pytest.approx(dyn)
    assert b.stats.train_trained_tokens == sum(1 + k % 7 + 1 for k in range(16))  # reply + <|eot_id|>
    pv = preview(b, tok, n=2)
    assert "[[a<|eot_id|>]]" in pv and pv.count("--- sample") == 2
    assert "\x1b[32m" in preview(b, tok, n=1, color=True)


def test_streaming_matches_and_repeats(tmp_path, tok):
    write_jsonl(tmp_path / "c.jsonl", chat_rows(120))
    cfg = DataConfig(train=["c.jsonl"], streaming=True, eval_split=0.1, shuffle_buffer=32, packing=True,
                     max_seq_len=128)
    b = build_data(cfg, tok, seed=0, base_dir=tmp_path)
    first = [p["sample_ids"] for p in b.train]
    assert first == [p["sample_ids"] for p in b.train]  # deterministic re-iteration
    train_ids = {s for ids in first for s in ids}
    eval_ids = {e["sample_id"] for e in b.eval}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 120 and eval_ids
    assert b.stats.train_samples == len(train_ids) and b.stats.packing_efficiency > 0.8
    other = build_data(cfg.model_copy(update={"packing": False}), tok, seed=0, base_dir=tmp_path)
    assert {e["sample_id"] for e in other.train} == train_ids


def test_eval_datasets_and_prompts(tmp_path, tok):
    write_jsonl(tmp_path / "t.jsonl", chat_rows(8))
    write_jsonl(tmp_path / "v.jsonl", chat_rows(3))
    b = build_data(DataConfig(train=["t.jsonl"], eval=["v.jsonl"], eval_prompts=2), tok, seed=0,
                   base_dir=tmp_path)
    assert b.dataset_names == ["t", "v"] and {e["dataset"] for e in b.eval} == {1}
    assert len(b.eval_prompts) == 2 and b.eval_prompts[1] == {
        "prompt_ids": tok("<|start_header_id|>user<|end_header_id|>\n\nq1<|eot_id|>"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")["input_ids"],
        "reference": "aa", "dataset": "v"}
    with pytest.raises(Exception, match="either eval"):
        DataConfig(train=["t.jsonl"], eval=["v.jsonl"], eval_split=0.1)


def test_num_proc_gives_identical_output(tmp_path, tok):
    write_jsonl(tmp_path / "c.jsonl", chat_rows(1100))  # > 2 encode chunks
    cfg = DataConfig(train=["c.jsonl"], eval_split=0.05)
    one = build_data(cfg, tok, seed=0, base_dir=tmp_path)
    two = build_data(cfg.model_copy(update={"num_proc": 2}), tok, seed=0, base_dir=tmp_path)
    assert one.train == two.train and one.eval == two.eval and one.stats == two.stats
