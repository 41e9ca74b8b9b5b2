"""``data.num_proc > 1`` with input known to fit one chunk (the rows a resume's skip still holds, realized): encoded
in this process, no worker pool started for it, and the same encodings as ``num_proc: 1``."""
from __future__ import annotations

import json
import multiprocessing.context
from pathlib import Path

import pytest

from peftlab.data import build
from peftlab.data.build import SourceRecord, encoded_chunks
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.streaming import ALL_ROWS
from peftlab.data.tokenize import Encoder
from peftlab.model.builtin import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def pools(monkeypatch) -> list[int]:
    """The worker pools started during the test (their sizes); each is a real pool."""
    started: list[int] = []
    real = multiprocessing.context.BaseContext.Pool

    def counted(self, processes=None, *args, **kwargs):
        started.append(processes)
        return real(self, processes, *args, **kwargs)
    monkeypatch.setattr(multiprocessing.context.BaseContext, "Pool", counted)
    return started


def _records(n: int) -> list[SourceRecord]:
    return [SourceRecord(k, f"gen:{k + 1}", {"kind": "text", "text": f"row {k} " + "x " * (k % 9)}) for k in range(n)]


def test_a_short_list_is_encoded_without_a_worker_pool(monkeypatch, tok):
    encoder = Encoder(tok)
    one = list(encoded_chunks(_records(5), encoder, num_proc=1))

    def no_pool(self, *args, **kwargs):
        raise AssertionError("a worker pool was started for 5 rows")
    monkeypatch.setattr(multiprocessing.context.BaseContext, "Pool", no_pool)
    two = list(encoded_chunks(_records(5), encoder, num_proc=2))
    assert [[c.row for c in chunk] for chunk, _ in two] == [[0, 1, 2, 3, 4]]
    assert [encs for _, encs in two] == [encs for _, encs in one] and len(one[0][1]) == 5


def test_a_list_of_more_than_one_chunk_still_goes_to_the_workers(monkeypatch, tok, pools):
    monkeypatch.setattr(build, "ENCODE_CHUNK", 4)
    encoder = Encoder(tok)
    assert [len(e) for _, e in encoded_chunks(_records(4), encoder, num_proc=2)] == [4] and pools == []
    got = list(encoded_chunks(_records(9), encoder, num_proc=2))
    assert pools == [2]
    assert [encs for _, encs in got] == [encs for _, encs in encoded_chunks(_records(9), encoder, num_proc=1)]


def test_a_resumed_stream_realizes_its_skipped_rows_without_a_pool_each(tmp_path: Path, tok, pools):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"messages": [{"role": "user", "content": f"{name} question {k}"},
                                     {"role": "assistant", "content": "a" * (1 + k % 7)}]}) + "\n" for k in range(30)))
    # a fractional weight draws its rows a buffer ahead: rows read (as pending) while the skip was on are trained
    # after it, realized buffer by buffer
    cfg = DataConfig(train=[{"path": "a.jsonl", "weight": 1.5}, {"path": "b.jsonl", "weight": 0.5}], streaming=True,
                     max_seq_len=64, shuffle_buffer=8)

    def resumed(num_proc: int) -> list:
        stream = build_data(cfg.model_copy(update={"num_proc": num_proc}), tok, seed=5, base_dir=tmp_path).train
        stream.known_rows = [ALL_ROWS, ALL_ROWS]  # as a checkpoint of a run past these rows holds it
        return list(stream.iter_pass(0, 20))

    whole = list(build_data(cfg, tok, seed=5, base_dir=tmp_path).train)
    one = resumed(1)
    assert pools == []
    fresh = list(build_data(cfg.model_copy(update={"num_proc": 2}), tok, seed=5, base_dir=tmp_path).train)
    streams = len(pools)  # a pool per dataset stream read (a, a's drawn half pass, b)
    two = resumed(2)
    assert len(whole) == 60 and fresh == whole and two == one == whole[20:]
    # the resumed pass reads the same streams; its realized buffers start no pool of their own
    assert streams == 3 and pools == [2] * (2 * streams)
