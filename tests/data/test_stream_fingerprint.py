"""A stream's resume fingerprint stands for what defines its examples (sources' content, tokenizer, data settings,
seed), not for the data cache's on-disk format: bumping ``CACHE_VERSION`` refuses no streaming resume, and the value
is the one checkpoints written so far hold."""
from __future__ import annotations

import hashlib
import json

import pytest

from peftlab.data import cache
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.streaming import StreamingExamples
from peftlab.model.builtin import build_tokenizer
from peftlab.trainer.state import RunInputs

ROWS = "".join(json.dumps({"instruction": f"q{k}", "output": "a" * (k + 1)}) + "\n" for k in range(6))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def stream(tmp_path, tok, rows: str = ROWS, **kw) -> StreamingExamples:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "t.jsonl").write_text(rows)
    cfg = DataConfig(train=["t.jsonl"], **{"max_seq_len": 32, "streaming": True, "shuffle_buffer": 4, **kw})
    return build_data(cfg, tok, seed=3, base_dir=tmp_path).train


def written_before(s: StreamingExamples) -> str:
    """The fingerprint as checkpoints written before this change hold it: the data cache's key of cache format 1."""
    blob = json.dumps({"version": 1, "settings": s.cfg.model_dump(mode="json", exclude={"num_proc"}), "seed": s.seed,
                       "sources": [src.fingerprint() for src in s.sources],
                       "tokenizer": cache.tokenizer_fingerprint(s.tok)}, sort_keys=True)
    return "stream-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_a_new_cache_format_leaves_the_stream_fingerprint_alone(tmp_path, tok, monkeypatch):
    s = stream(tmp_path, tok)
    before = RunInputs.of(s, None).data_fingerprint
    key = cache.cache_key(s.cfg, tok, s.seed, [src.fingerprint() for src in s.sources])
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)
    assert cache.cache_key(s.cfg, tok, s.seed, [src.fingerprint() for src in s.sources]) != key  # entries: missed
    assert RunInputs.of(s, None).data_fingerprint == before == s.fingerprint()  # a resume: accepted


def test_existing_checkpoints_hold_the_same_fingerprint(tmp_path, tok):
    s = stream(tmp_path, tok)
    assert s.fingerprint() == written_before(s)


def test_what_defines_the_examples_still_changes_it(tmp_path, tok):
    base = stream(tmp_path / "a", tok).fingerprint()
    assert stream(tmp_path / "b", tok).fingerprint() == base  # the same content elsewhere
    assert stream(tmp_path / "c", tok, shuffle_buffer=5).fingerprint() != base  # a data setting
    assert stream(tmp_path / "d", tok, ROWS.replace("q1", "q9")).fingerprint() != base  # the file's content
    s = stream(tmp_path / "e", tok)
    s.seed = 4
    assert s.fingerprint() != base  # the seed
    tok2 = build_tokenizer()
    tok2.chat_template = tok2.chat_template.replace("<|eot_id|>", "<|end_of_text|>")
    assert stream(tmp_path / "f", tok2).fingerprint() != base  # the tokenizer
