"""A stream's resume fingerprint stands for what defines its examples (sources' content, tokenizer, data settings,
seed), not for the data cache's on-disk format: bumping ``CACHE_VERSION`` refuses no streaming resume, nor does a
data setting added later while it is at its default, and the value is the one checkpoints written so far hold."""
from __future__ import annotations

import hashlib
import json

import pytest

from peftlab.data import cache
from peftlab.data.config import DataConfig, DatasetSpec
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
    blob = json.dumps({"version": 1, "settings": s.cfg.model_dump(mode="json", include=cache.KEYED_DATA_FIELDS), "seed": s.seed,
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


def test_the_fingerprint_is_the_value_checkpoints_hold(tmp_path, tok):
    # computed by the implementation that wrote the checkpoints so far (every data setting but num_proc dumped)
    assert stream(tmp_path, tok).fingerprint() == "stream-1d771b1553db9e16"


class NewerSpec(DatasetSpec):
    new_option: str = "plain"  # a dataset setting added after checkpoints were written


class NewerConfig(DataConfig):
    new_setting: int = 7  # a data setting added after checkpoints were written
    train: list[NewerSpec]


def newer(s: StreamingExamples, spec: dict | None = None, **settings) -> StreamingExamples:
    """``s`` as a later peftlab reads the same recipe: its DataConfig and DatasetSpec have a field more."""
    dumped = s.cfg.model_dump()
    dumped["train"] = [{**d, **(spec or {})} for d in dumped["train"]]
    s.cfg = NewerConfig(**{**dumped, **settings})
    return s


def test_a_new_data_setting_at_its_default_leaves_the_fingerprint_alone(tmp_path, tok):
    """A setting added later is hashed only when set away from its default: at its default the fingerprint (and the
    cache entries' keys) stay as they were, so no streaming resume is refused for a field the recipe does not use."""
    s = stream(tmp_path, tok)
    key = cache.cache_key(s.cfg, tok, s.seed, [src.fingerprint() for src in s.sources])
    assert newer(s).fingerprint() == "stream-1d771b1553db9e16"
    assert cache.cache_key(s.cfg, tok, s.seed, [src.fingerprint() for src in s.sources]) == key
    assert newer(s, new_setting=7, spec={"new_option": "plain"}).fingerprint() == "stream-1d771b1553db9e16"
    assert newer(s, new_setting=8).fingerprint() != "stream-1d771b1553db9e16"  # set: it defines the examples
    assert newer(s, spec={"new_option": "fancy"}).fingerprint() != "stream-1d771b1553db9e16"


def test_every_data_setting_of_today_is_hashed_even_at_its_default():
    """(A field added later is not listed here, nor in cache.KEYED_DATA_FIELDS: at its default it is not hashed.)"""
    assert cache.KEYED_DATA_FIELDS <= set(DataConfig.model_fields)
    assert cache.KEYED_DATASET_FIELDS <= set(DatasetSpec.model_fields)
    assert cache.data_settings(DataConfig(train=["t.jsonl"])) == {
        "train": [{"path": "t.jsonl", "format": "auto", "split": "train", "fields": {}, "weight": 1.0,
                   "loss_weight": 1.0, "name": None}],
        "eval": [], "eval_split": 0.0, "template": None, "train_on": "assistant", "max_seq_len": 1024,
        "packing": False, "overlength": "truncate", "on_bad_rows": "error", "system_prompt": None,
        "max_samples": None, "streaming": False, "mixture": "scale", "shuffle": True, "label_type": "auto",
        "eval_prompts": 32, "shuffle_buffer": 10_000}
