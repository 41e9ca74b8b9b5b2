"""``data.streaming: true`` (peftlab/data/streaming.py): on the same file the stream yields exactly the examples
of the in-memory pipeline (tokens, labels, sample ids, weights; in the same order while the shuffle buffer holds
the file), a smaller buffer only shuffles within itself, every pass repeats the same order, the eval rows are a
seeded fraction of the first buffer that never reaches training, and a mixture interleaves by weight."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.streaming import held_out, is_stream
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer

N = 60


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def chat(tmp_path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"question {k}"},
                          {"role": "assistant", "content": "a" * (1 + k % 7)}]} for k in range(N)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _both(base: Path, tok, **settings):
    memory = build_data(DataConfig(train=["c.jsonl"], **settings), tok, seed=0, base_dir=base)
    stream = build_data(DataConfig(train=["c.jsonl"], streaming=True, **settings), tok, seed=0, base_dir=base)
    return list(memory.train), stream


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_stream_yields_the_in_memory_examples(chat, tok, shuffle):
    memory, stream = _both(chat, tok, shuffle=shuffle, shuffle_buffer=N)
    assert list(stream.train) == memory  # every field of every example, in the same order
    assert len(memory) == N and stream.stats.train_samples == N
    assert stream.stats.train_tokens == sum(len(e["input_ids"]) for e in memory)


def test_packed_streams_hold_the_same_packs(chat, tok):
    memory, stream = _both(chat, tok, packing=True, shuffle=False, shuffle_buffer=N, max_seq_len=256)

    def key(pack):
        return tuple(pack["sample_ids"]), tuple(pack["input_ids"]), tuple(pack["labels"])

    assert sorted(map(key, stream.train)) == sorted(map(key, memory))
    assert stream.stats.packs == len(memory) < N and stream.stats.packing_efficiency > 0.8


def test_a_small_buffer_shuffles_within_itself_and_every_pass_repeats(chat, tok):
    buffer = 16
    stream = build_data(DataConfig(train=["c.jsonl"], streaming=True, shuffle_buffer=buffer), tok, seed=3,
                        base_dir=chat)
    first = [e["sample_id"] for e in stream.train]
    assert [e["sample_id"] for e in stream.train] == first  # a resumed run can skip what it consumed
    assert stream.stats.train_samples == N  # counted per pass, not summed over passes
    assert sorted(first) == list(range(N)) and first != list(range(N))
    for window in range(0, N, buffer):  # row r is yielded within the buffer it was read into
        assert sorted(first[window:window + buffer]) == list(range(window, min(window + buffer, N)))
    other_seed = build_data(DataConfig(train=["c.jsonl"], streaming=True, shuffle_buffer=buffer), tok, seed=4,
                            base_dir=chat)
    assert [e["sample_id"] for e in other_seed.train] != first


def test_held_out_rows_are_seeded_order_free_and_within_the_first_buffer():
    picks = [held_out(0, 0, row, 0.25, 1000) for row in range(1000)]
    assert 200 < sum(picks) < 300
    assert picks == [held_out(0, 0, row, 0.25, 1000) for row in range(1000)]  # a row's fate is its own
    assert picks != [held_out(1, 0, row, 0.25, 1000) for row in range(1000)]  # ... and the seed's
    assert not any(held_out(0, 0, row, 0.25, 100) for row in range(100, 1000))  # beyond the window: trained
    assert not any(held_out(0, 0, row, 0.0, 1000) for row in range(1000))


def test_eval_rows_never_reach_training(chat, tok, caplog):
    with caplog.at_level(logging.INFO, logger="peftlab.data.streaming"):
        stream = build_data(DataConfig(train=["c.jsonl"], streaming=True, eval_split=0.2, shuffle_buffer=40,
                                       eval_prompts=3), tok, seed=0, base_dir=chat)
    n_eval = len(stream.eval)
    assert caplog.messages == [  # said at start: in memory, eval_split draws from every row
        (f"data: eval_split 0.2 with streaming holds out {n_eval} eval rows among the first 40 rows "
        "(data.shuffle_buffer) of each dataset only; every later row is trained. For an eval set drawn from the "
        "whole data, give data.eval files")]
    train_ids = [e["sample_id"] for e in stream.train]
    eval_ids = [e["sample_id"] for e in stream.eval]
    assert eval_ids == [r for r in range(40) if held_out(0, 0, r, 0.2, 40)] and eval_ids
    assert sorted(train_ids + eval_ids) == list(range(N))
    assert stream.stats.eval_samples == len(eval_ids) and len(stream.eval_prompts) == 3


def test_a_mixture_interleaves_by_weight_and_drains_every_dataset(tmp_path, tok):
    for name, n in (("a", 90), ("b", 30)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": f"{name}{k} ", "completion": "ok"}) + "\n" for k in range(n)))
    cfg = DataConfig(train=[{"path": "a.jsonl", "weight": 3.0}, {"path": "b.jsonl", "weight": 1.0}], streaming=True,
                     shuffle=False)
    stream = build_data(cfg, tok, seed=0, base_dir=tmp_path)
    order = [e["dataset"] for e in stream.train]
    # the in-memory "scale" counts: a is read 3 times (tests/data/test_streaming_mixture.py for fractions)
    assert Counter(order) == {0: 270, 1: 30}
    assert 0.6 < order[:40].count(0) / 40 < 0.9
    assert [d.drawn for d in stream.stats.datasets] == [270, 30]


def test_classification_data_cannot_stream(tmp_path, tok):
    (tmp_path / "l.jsonl").write_text(json.dumps({"text": "good", "label": "pos"}) + "\n")
    stream = build_data(DataConfig(train=["l.jsonl"], streaming=True), tok, seed=0, base_dir=tmp_path)
    with pytest.raises(PeftlabError, match="data.streaming: classification data is not supported when streaming; "
                                           "set data.streaming: false"):
        list(stream.train)


def test_is_stream_is_true_for_streamed_rows_only(chat, tok):
    memory, stream = _both(chat, tok)
    assert is_stream(stream.train)
    assert not is_stream(memory) and not is_stream(stream.eval)

    class LooksLikeAStream(list):  # rows in memory that happen to carry a stream's method names are rows
        def iter_pass(self, epoch):
            return iter(self)

        def fingerprint(self):
            return "not a stream"

    assert not is_stream(LooksLikeAStream(memory))
