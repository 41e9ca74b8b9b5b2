"""Cache entries written by earlier peftlab: a classification / regression entry written before its trained tokens
were counted (commit 3e8f7eb: 0) reports them as a fresh build does; a new cache format (``CACHE_VERSION``) rebuilds
entries without refusing an in-memory run's resume."""
from __future__ import annotations

import json

import pytest
import torch

from peftlab.data import cache
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.stats import format_stats
from peftlab.model.builtin import build_tokenizer
from peftlab.trainer.state import RunInputs


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("labels", [["neg", "pos", "neu"], [0.5, 1.25, -2.0]], ids=["classification", "regression"])
def test_a_class_entry_written_before_trained_tokens_reports_them(tmp_path, tok, labels):
    rows = [{"text": "word " * (1 + k % 5) + f"row {k}", "label": labels[k % 3]} for k in range(10)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=[{"path": "c.jsonl", "format": "classification"}], eval_split=0.2, max_seq_len=64)
    fresh = build_data(cfg, tok, seed=0, base_dir=tmp_path)
    build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    [entry] = (tmp_path / "cache").glob("data-*.pt")
    state = torch.load(entry, weights_only=True)
    state["stats"]["train_trained_tokens"] = 0  # what the build wrote before 3e8f7eb
    for st in state["stats"]["datasets"]:
        st["trained_tokens"] = 0
    torch.save(state, entry)

    old = build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert old.from_cache and old.train == fresh.train
    inputs = sum(len(e["input_ids"]) for e in old.train)
    assert old.stats.train_trained_tokens == inputs > 0
    assert old.stats == fresh.stats  # per dataset, train and eval split, as a fresh build counts them
    assert f"{inputs} trained (100.0%)" in format_stats(old.stats)


def test_a_language_modelling_entry_keeps_its_counts(tmp_path, tok):
    rows = [{"instruction": f"q{k}", "input": "", "output": "a" * (k + 1)} for k in range(6)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=["a.jsonl"], max_seq_len=64)
    first = build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    again = build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert again.from_cache and again.stats == first.stats
    assert 0 < again.stats.train_trained_tokens < again.stats.train_tokens  # the prompts are not trained


def test_a_new_cache_format_refuses_no_in_memory_resume(tmp_path, tok, monkeypatch):
    rows = [{"instruction": f"q{k}", "input": "", "output": "a" * (k + 1)} for k in range(6)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=["a.jsonl"], max_seq_len=64)
    before = build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)
    after = build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert not after.from_cache and len(list((tmp_path / "cache").glob("data-*.pt"))) == 2  # rebuilt
    # what a resume compares (peftlab.checkpoint.resume): the rows' fingerprint, the same
    assert RunInputs.of(after.train, None).saved() == RunInputs.of(before.train, None).saved()
