"""A resumed stream (``iter_pass(epoch, skip)``, peftlab/data/streaming.py): it yields exactly the rest of the pass
— whatever rows were dropped or split, through mixtures, eval holds-out and later passes — and it counts instead
of tokenizing the rows of the skipped buffers that the stream has learned make one example each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.streaming import ALL_ROWS
from peftlab.data.tokenize import Encoder
from peftlab.model.builtin import build_tokenizer

LONG = (20, 41)  # rows of a.jsonl over max_seq_len: dropped (overlength: drop), split in several, or truncated


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    for name, n in (("a", 60), ("b", 30)):
        rows = [{"messages": [{"role": "user", "content": f"{name} question {k}"},
                              {"role": "assistant", "content": "b " * 150 if name == "a" and k in LONG else "a" * (1 + k % 7)}]}
                for k in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """How many records the encoder was given, call by call."""
    calls: list[int] = []
    encode_batch = Encoder.encode_batch

    def counting(self, records):
        calls.append(len(records))
        return encode_batch(self, records)
    monkeypatch.setattr(Encoder, "encode_batch", counting)
    return calls


def _stream(files: Path, tok, **settings):
    cfg = DataConfig(streaming=True, max_seq_len=64, shuffle_buffer=8, **{"train": ["a.jsonl"], **settings})
    return build_data(cfg, tok, seed=5, base_dir=files).train


MIXTURE = {"train": [{"path": "a.jsonl", "weight": 1.5}, {"path": "b.jsonl", "weight": 1.0}], "eval_split": 0.1}


@pytest.mark.parametrize("settings, learned", [
    ({"overlength": "truncate"}, [ALL_ROWS]),
    ({"overlength": "drop"}, [LONG[0]]),
    ({"overlength": "split", **MIXTURE}, [LONG[0], ALL_ROWS]),
    ({"overlength": "truncate", **MIXTURE}, [ALL_ROWS, ALL_ROWS]),
])
def test_a_resumed_pass_is_the_rest_of_the_pass(files, tok, settings, learned):
    ref = _stream(files, tok, **settings)
    passes = [list(ref.iter_pass(epoch)) for epoch in (0, 1)]
    assert ref.known_rows == learned  # learned while reading
    n = len(passes[0])
    for known in ([0] * len(learned), learned):  # a checkpoint from before this was kept; one with the bound
        resumed = _stream(files, tok, **settings)
        resumed.known_rows = list(known)
        for epoch in (0, 1):
            for skip in (0, 1, 7, 8, 9, 16, 27, n - 1, n, n + 5):
                assert list(resumed.iter_pass(epoch, skip)) == passes[epoch][skip:], (known, epoch, skip)


def test_skipped_buffers_are_counted_not_tokenized(files, tok, encoded):
    ref = _stream(files, tok)
    whole = list(ref.iter_pass(0))
    assert ref.known_rows == [ALL_ROWS] and sum(encoded) == len(whole) == 60
    resumed = _stream(files, tok)
    resumed.known_rows = list(ref.known_rows)
    encoded.clear()
    assert list(resumed.iter_pass(0, 40)) == whole[40:]
    assert sum(encoded) == 20  # the 5 skipped buffers' 40 rows were only counted

    # where a row made no example (overlength: drop, row 20), rows from there on are tokenized to count them
    dropping = _stream(files, tok, overlength="drop")
    rest = list(dropping.iter_pass(0))[40:]
    resumed = _stream(files, tok, overlength="drop")
    resumed.known_rows = list(dropping.known_rows)
    encoded.clear()
    assert list(resumed.iter_pass(0, 40)) == rest and sum(encoded) == 60 - LONG[0]

    # packs depend on tokens: a packed stream tokenizes what it skips
    packed = list(_stream(files, tok, packing=True).iter_pass(0))
    resumed = _stream(files, tok, packing=True)
    resumed.known_rows = [ALL_ROWS]
    encoded.clear()
    assert list(resumed.iter_pass(0, 3)) == packed[3:] and sum(encoded) == 60
