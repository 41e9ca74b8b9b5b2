"""``data.num_proc > 1``: worker processes read their input lazily, a bounded number of chunks ahead, in order."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from peftlab.data import build
from peftlab.data.build import SourceRecord, encoded_chunks
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.tokenize import Encoder
from peftlab.model.builtin import build_tokenizer

N_ROWS, CHUNK = 200, 4


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(build_tokenizer())


def records(read: list[int]) -> Iterator[SourceRecord]:
    """A source that says how far it has been read (``read[0]`` rows)."""
    for k in range(N_ROWS):
        read[0] = k + 1
        yield SourceRecord(k, f"gen:{k + 1}", {"kind": "text", "text": f"row {k} " + "x " * (k % 9)})


def test_workers_read_the_source_lazily_and_in_order(monkeypatch, encoder):
    monkeypatch.setattr(build, "ENCODE_CHUNK", CHUNK)  # small chunks: many of them from a small source
    read = [0]
    out = encoded_chunks(records(read), encoder, num_proc=2)
    first_chunk, first_encs = next(out)
    # what was read before the first chunk came back: the chunks in flight (2 per worker: 16 rows), not the source
    assert read[0] <= N_ROWS // 4
    got = [(first_chunk, first_encs), *out]
    assert read[0] == N_ROWS
    one = list(encoded_chunks(records([0]), encoder, num_proc=1))
    assert [[c.row for c in chunk] for chunk, _ in got] == [[c.row for c in chunk] for chunk, _ in one]
    assert [encs for _, encs in got] == [encs for _, encs in one]
    assert sum(len(encs) for _, encs in got) == N_ROWS


def test_streaming_with_workers_gives_the_same_examples(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "ENCODE_CHUNK", CHUNK)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"row {k} " + "y " * (k % 5)}) + "\n"
                                              for k in range(40)))
    cfg = DataConfig(train=["t.jsonl"], streaming=True, shuffle_buffer=8, max_seq_len=32)
    tok = build_tokenizer()
    one = list(build_data(cfg, tok, seed=0, base_dir=tmp_path).train)
    two = list(build_data(cfg.model_copy(update={"num_proc": 2}), tok, seed=0, base_dir=tmp_path).train)
    assert len(one) == 40 and one == two
