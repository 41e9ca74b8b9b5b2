"""build_data end to end on small hand-written files with the built-in tokenizer."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from peftlab.data.collate import collate
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.preview import render_preview as preview
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer

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
    from peftlab.data.stats import format_stats

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


# ---- unreadable rows (not UTF-8, not JSON) follow data.on_bad_rows --------------------------------

LATIN1 = b'{"text": "one"}\n{"text": "caf\xe9"}\n{"text": "three"}\n'


def test_non_utf8_line_is_one_clear_error_or_a_counted_skip(tmp_path, tok):
    (tmp_path / "l.jsonl").write_bytes(LATIN1)
    with pytest.raises(PeftlabError) as e:
        build_data(DataConfig(train=["l.jsonl"]), tok, seed=0, base_dir=tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'l.jsonl'}:2: unreadable row in dataset 'l' (data.train[0]): not UTF-8 text (byte 0xe9 at "
        "byte offset 29 of the file). Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT` for "
        "Latin-1 text), or set data.on_bad_rows: skip to leave such rows out (they are counted).")
    for streaming in (False, True):
        b = build_data(DataConfig(train=["l.jsonl"], on_bad_rows="skip", shuffle=False, streaming=streaming), tok,
                       seed=0, base_dir=tmp_path)
        texts = [tok.decode(x["input_ids"], skip_special_tokens=True) for x in b.train]
        assert texts == ["one", "three"]
        assert b.stats.bad_rows == 1 and b.stats.datasets[0].rows == 3


def test_bad_json_line_follows_on_bad_rows(tmp_path, tok):
    (tmp_path / "j.jsonl").write_text('{"text": "one"}\n{"text": \n{"text": "three"}\n')
    with pytest.raises(PeftlabError, match=r"j\.jsonl:2: unreadable row in dataset 'j' \(data\.train\[0\]\): not valid "
                                           r"JSON \(Expecting value at column 10\)\. Fix the line: each line of a "
                                           r"\.jsonl file must be one JSON object, or set data\.on_bad_rows: skip"):
        build_data(DataConfig(train=["j.jsonl"]), tok, seed=0, base_dir=tmp_path)
    b = build_data(DataConfig(train=["j.jsonl"], on_bad_rows="skip"), tok, seed=0, base_dir=tmp_path)
    assert len(b.train) == 2 and b.stats.bad_rows == 1


def test_non_utf8_through_the_cli(tmp_path, capsys):
    import yaml

    from peftlab.cli.main import main

    (tmp_path / "l.jsonl").write_bytes(LATIN1)
    recipe = {"model": {"name": "builtin:micro-llama"}, "data": {"train": ["l.jsonl"], "max_seq_len": 64}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["data", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"peftlab: error: {tmp_path / 'l.jsonl'}:2: unreadable row in dataset 'l' (data.train[0]): "
                          "not UTF-8 text (byte 0xe9 at byte offset 29 of the file)")
    assert main(["data", str(tmp_path / "r.yaml"), "--set", "data.on_bad_rows=skip"]) == 0
    assert "bad rows skipped: 1" in capsys.readouterr().out


# ---- the over-length hint fits the current data.overlength ---------------------------------------

def test_overlength_hint_fits_the_setting(tmp_path, tok):
    # a prompt longer than max_seq_len: truncation leaves nothing to train on
    write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "u" * 40},
                                                     {"role": "assistant", "content": "a"}]}])
    full = build_data(DataConfig(train=["p.jsonl"]), tok, seed=0, base_dir=tmp_path)
    longest = len(full.train[0]["input_ids"])
    with pytest.raises(PeftlabError) as e:
        build_data(DataConfig(train=["p.jsonl"], max_seq_len=16), tok, seed=0, base_dir=tmp_path)
    msg = str(e.value)
    assert msg.startswith("data.train[0] (p.jsonl): no training samples left after over-length handling (1 dropped): "
                          "overlength: truncate keeps the first 16 tokens (data.max_seq_len) of each sample, and in "
                          "these samples they hold nothing to train on (the prompt alone is longer). Raise "
                          f"data.max_seq_len (the longest sample has {longest} tokens), shorten the prompts, or set "
                          "data.overlength: split")
    advice = msg.split("Raise", 1)[1]
    assert "truncate" not in advice and "drop" not in advice  # no advice to set what is already set
    split = build_data(DataConfig(train=["p.jsonl"], max_seq_len=16, overlength="split"), tok, seed=0,
                       base_dir=tmp_path)  # the fix it names works: the reply is trained in the last piece
    assert split.train and split.stats.train_trained_tokens > 0
    # everything longer than max_seq_len with overlength: drop
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 50}, {"text": "y" * 30}])
    with pytest.raises(PeftlabError) as e:
        build_data(DataConfig(train=["t.jsonl"], max_seq_len=20, overlength="drop"), tok, seed=0, base_dir=tmp_path)
    msg = str(e.value)
    assert msg.endswith("(2 dropped): every sample is longer than data.max_seq_len (20) and overlength: drop leaves "
                        "them out. Raise data.max_seq_len (the longest sample has 52 tokens), or set "
                        "data.overlength: truncate (keep the first max_seq_len tokens) or split (cut into pieces of "
                        "max_seq_len tokens)")  # 52: BOS + 50 x + EOS


def test_overlength_hint_for_split():
    from peftlab.data.build import overlength_hint
    from peftlab.data.stats import DatasetStats

    st = DatasetStats("d", longest=300)
    hint = overlength_hint(DataConfig(train=["x.jsonl"], max_seq_len=8, overlength="split"), st)
    assert hint == ("overlength: split cut the samples into pieces of 8 tokens (data.max_seq_len) and no piece "
                    "holds a trained token after its first position. Raise data.max_seq_len (the longest sample "
                    "has 300 tokens)")
    assert "overlength: truncate" not in hint and "set data.overlength" not in hint
