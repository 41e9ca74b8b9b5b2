"""The recipe's data: section: shorthand forms, unknown keys, conflicting settings."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from peftlab.data.config import DataConfig, DatasetSpec


def test_shorthands():
    assert [s.path for s in DataConfig(train="a.jsonl").train] == ["a.jsonl"]
    cfg = DataConfig(train=["a.jsonl", {"path": "b.parquet", "weight": 2}], eval="v.json")
    assert [s.path for s in cfg.train] == ["a.jsonl", "b.parquet"] and cfg.train[1].weight == 2.0
    assert [s.path for s in cfg.eval] == ["v.json"]
    assert DatasetSpec(path="dir/alpaca_small.json").display_name() == "alpaca_small"
    assert DatasetSpec(path="tatsu-lab/alpaca").display_name() == "alpaca"
    assert DatasetSpec(path="x.jsonl", name="mine").display_name() == "mine"


def test_unknown_key_and_bad_values_are_named():
    with pytest.raises(ValidationError, match="packin"):
        DataConfig(train="a.jsonl", packin=True)
    with pytest.raises(ValidationError, match="format"):
        DataConfig(train=[{"path": "a.jsonl", "format": "yaml"}])
    with pytest.raises(ValidationError, match="train_on"):
        DataConfig(train="a.jsonl", train_on="users")
    with pytest.raises(ValidationError, match="either eval"):
        DataConfig(train="a.jsonl", eval="b.jsonl", eval_split=0.1)
    with pytest.raises(ValidationError, match="no datasets"):
        DataConfig(train=[])
    with pytest.raises(ValidationError, match="path is empty"):
        DataConfig(train=[{"path": " "}])


def test_field_paths_are_checked():
    spec = DatasetSpec(path="a.jsonl", fields={"instruction": "data.question", "output": "answers[0].text"})
    assert spec.fields["output"] == "answers[0].text"
    for bad in ("data..question", "answers[x]", "answers[0", ".q"):
        with pytest.raises(ValidationError, match=r"fields\.instruction: .* is not a column name or a path into "
                                                  r"nested rows; use keys joined by dots and \[N\] for list items"):
            DatasetSpec(path="a.jsonl", fields={"instruction": bad})
