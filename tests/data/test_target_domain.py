"""Target-domain rows of a DANN run: training rows keep token ids only (a label in the files never reaches them),
eval rows get the SOURCE label ids, and bad rows are named by file:row."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftlab.data.config import DataConfig, DatasetSpec
from peftlab.data.target_domain import build_target_data
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer

LABELS = {"food": 0, "sport": 1, "weather": 2}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _build(tmp: Path, target: list[dict], target_eval: list[dict] | None = None, **cfg):
    dann = SimpleNamespace(target=[DatasetSpec(path=str(_write(tmp / "t.jsonl", target)))],
                           target_eval=[DatasetSpec(path=str(_write(tmp / "e.jsonl", target_eval)))]
                           if target_eval is not None else [])
    data_cfg = DataConfig(train=["unused.jsonl"], max_seq_len=cfg.pop("max_seq_len", 32), **cfg)
    return build_target_data(dann, data_cfg, build_tokenizer(), task="classification", label_map=LABELS,
                             base_dir=tmp)


def test_training_rows_never_carry_a_label_and_eval_rows_use_the_source_ids(tmp_path):
    tok = build_tokenizer()
    rows = [{"text": "storm and fog", "label": "weather"}, {"text": "golf coach", "label": "sport"}]
    got = _build(tmp_path, rows)
    assert [set(r) for r in got.train] == [{"input_ids", "sample_id"}] * 2
    assert got.train[0]["input_ids"] == tok("storm and fog")["input_ids"]
    assert got.eval_from == "dann.target" and [r["label"] for r in got.eval] == [2, 1]  # all labelled: evaluated
    unlabelled = _build(tmp_path, [rows[0], {"text": "cheese"}])
    assert unlabelled.eval is None and unlabelled.eval_from == "" and len(unlabelled.train) == 2
    separate = _build(tmp_path, [{"text": "cheese"}], [{"text": "honey pasta", "label": "food"}])
    assert separate.eval_from == "dann.target_eval" and separate.eval[0]["label"] == 0
    cut = _build(tmp_path, [{"text": "x" * 80}], max_seq_len=16)
    assert len(cut.train[0]["input_ids"]) == 16
    with pytest.raises(PeftlabError, match="every row is longer"):
        _build(tmp_path, [{"text": "x" * 80}], max_seq_len=16, overlength="drop")


@pytest.mark.parametrize("target, target_eval, message", [
    ([{"text": "a"}, {"label": "food"}], None, r"t\.jsonl:2: bad row in dann\.target\[0\].*'text' is missing"),
    ([{"text": "a"}], [{"text": "b", "label": "music"}],
     r"e\.jsonl:1: dann\.target_eval\[0\] label 'music' is not a class of the source data \(food, sport, weather\)"),
    ([{"text": "a"}], [{"text": "b"}], r"e\.jsonl:1: dann\.target_eval\[0\] row has no label"),
])
def test_bad_target_rows_are_named(tmp_path, target, target_eval, message):
    with pytest.raises(PeftlabError, match=message):
        _build(tmp_path, target, target_eval)


def test_bad_rows_can_be_skipped(tmp_path):
    got = _build(tmp_path, [{"text": "a"}, {"text": ""}, {"text": "b"}], on_bad_rows="skip")
    assert len(got.train) == 2
