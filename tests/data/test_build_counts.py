"""The data statistics count trained tokens as the run's ``tokens_seen`` does: for a classification or regression
row, its input tokens (every one feeds the pooled state the loss trains); for language modelling, the labels."""
from __future__ import annotations

import json

import pytest

from peftlab.data.build import trained_tokens
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.stats import format_stats
from peftlab.model.builtin import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("labels", [["neg", "pos", "neu"], [0.5, 1.25, -2.0]], ids=["classification", "regression"])
def test_class_rows_count_their_input_tokens(tmp_path, tok, labels):
    rows = [{"text": "word " * (1 + k % 7) + f"row {k}", "label": labels[k % 3]} for k in range(12)]
    rows.append({"text": "long " * 40, "label": labels[0]})  # over max_seq_len: truncated, its kept tokens count
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=[{"path": "c.jsonl", "format": "classification"}], eval_split=0.25, max_seq_len=64)
    b = build_data(cfg, tok, seed=0, base_dir=tmp_path)
    train_st, eval_st = b.stats.datasets
    assert train_st.truncated + eval_st.truncated == 1
    inputs = sum(len(e["input_ids"]) for e in b.train)
    assert inputs > 0
    assert b.stats.train_trained_tokens == b.stats.train_tokens == inputs
    assert train_st.trained_tokens == train_st.tokens == inputs  # weight 1: the drawn rows are the dataset's rows
    assert eval_st.trained_tokens == sum(len(e["input_ids"]) for e in b.eval)
    assert f"{inputs} trained (100.0%)" in format_stats(b.stats)


def test_one_rule_for_language_modelling_and_class_rows():
    assert trained_tokens({"input_ids": [1, 2, 3, 4], "label": 1}) == 4
    assert trained_tokens({"input_ids": [1, 2, 3, 4], "label": 0.0}) == 4
    assert trained_tokens({"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}) == 2
    assert trained_tokens({"input_ids": [1, 2, 3], "labels": [1, -100, 3]}) == 1  # the first label is never predicted
