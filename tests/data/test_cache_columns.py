"""A cache entry keeps its rows by key, as a few tensors (the weights-only unpickler reads a list of rows one number
at a time): the rows read back are exactly those written, types included; an entry written as a list of rows reads
and is rewritten as columns, unless the rewrite is refused."""
from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from peftlab.data import cache
from peftlab.data.build import DataBundle
from peftlab.data.cache import load_or_build
from peftlab.data.stats import DataStats
from peftlab.errors import PeftlabError

KEY = "0123456789abcdef" * 4

ROWS = [
    {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "sample_id": 0, "dataset": 0, "loss_weight": 1.0},
    {"input_ids": [4], "labels": [-100], "sample_id": (1 << 32) | 7, "dataset": 1, "loss_weight": 0.5,
     "weight": 2.0},  # a key only some rows have
    {"input_ids": [], "labels": [], "sample_id": 2, "dataset": 0, "loss_weight": [0.5, 1.0]},  # scalar or list
    {"input_ids": [2**40, 5], "labels": [True, 5], "sample_id": 2**70, "dataset": 0, "loss_weight": 1},  # odd kinds
]
CLASS = [{"input_ids": [5, 6], "label": 1, "note": "a"}, {"input_ids": [7], "label": 0, "note": None}]
REGRESSION = [{"input_ids": [5, 6], "label": 1.5}, {"input_ids": [7], "label": -2.0}]


def exact(rows):
    """Rows with every value's type spelled out (1 == 1.0 == True to ``==``)."""
    def typed(v):
        return [typed(x) for x in v] if isinstance(v, list) else (type(v).__name__, v)
    return [{k: typed(v) for k, v in sorted(r.items())} for r in rows]


def bundle(train, eval_=None) -> DataBundle:
    return DataBundle(train=train, eval=eval_, eval_prompts=[{"prompt_ids": [1, 2], "reference": "r", "dataset": "d"}],
                      stats=DataStats(max_seq_len=8, train_samples=len(train)), dataset_names=["d"], label_map={"a": 0})


def test_rows_read_back_exactly(tmp_path):
    for k, (train, eval_) in enumerate([(ROWS, None), (CLASS, CLASS[:1]), (REGRESSION, REGRESSION)]):
        written = load_or_build(tmp_path / str(k), KEY, lambda t=train, e=eval_: bundle(t, e))
        read = load_or_build(tmp_path / str(k), KEY, never)
        assert not written.from_cache and read.from_cache
        assert exact(read.train) == exact(train)
        assert (read.eval is None) if eval_ is None else exact(read.eval) == exact(eval_)
        assert (read.eval_prompts, read.stats, read.label_map) == (written.eval_prompts, written.stats,
                                                                   written.label_map)


def test_the_entry_holds_tokens_as_tensors(tmp_path):
    load_or_build(tmp_path, KEY, lambda: bundle(ROWS[:2] * 50))
    [entry] = tmp_path.glob("data-*.pt")
    columns = torch.load(entry, weights_only=True)["train"]["columns"]
    ids = columns["input_ids"]
    assert isinstance(ids["flat"], torch.Tensor) and ids["flat"].dtype == torch.int32 and ids["flat"].numel() == 200
    assert ids["lens"].tolist() == [3, 1] * 50
    assert isinstance(columns["sample_id"]["scalars"], torch.Tensor)
    assert columns["weight"]["rows"].tolist() == list(range(1, 100, 2))


def write_as_rows(tmp_path) -> Path:
    old = bundle(ROWS, CLASS)
    state = asdict(old)  # the form written before the columns
    state["stats"] = old.stats.to_dict()
    torch.save(state, tmp_path / f"data-{KEY[:32]}.pt")
    return tmp_path / f"data-{KEY[:32]}.pt"


def never():
    raise AssertionError("rebuilt")


def test_an_entry_written_as_a_list_of_rows_reads_and_is_rewritten_as_columns(tmp_path):
    entry = write_as_rows(tmp_path)
    read = load_or_build(tmp_path, KEY, never)
    assert read.from_cache and exact(read.train) == exact(ROWS) and exact(read.eval) == exact(CLASS)
    assert "columns" in torch.load(entry, weights_only=True)["train"]  # slow to read once only
    again = load_or_build(tmp_path, KEY, never)
    assert exact(again.train) == exact(ROWS) and exact(again.eval) == exact(CLASS) and again.stats == read.stats


def test_a_refused_rewrite_leaves_the_old_entry_readable(tmp_path, monkeypatch, caplog):
    entry = write_as_rows(tmp_path)

    def full(path, write):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(cache, "atomic_write", full)
    with caplog.at_level(logging.INFO, logger="peftlab.data.cache"):
        read = load_or_build(tmp_path, KEY, never)
    assert exact(read.train) == exact(ROWS) and isinstance(torch.load(entry, weights_only=True)["train"], list)
    assert f"{entry} is kept in its older, slower form" in caplog.text and "No space left" in caplog.text


def test_token_columns_are_converted_a_slice_at_a_time(tmp_path, monkeypatch):
    rows = [{"input_ids": list(range(n)), "labels": [-100] * n} for n in (0, 2, 5, 1, 0, 3, 7, 2)]
    monkeypatch.setattr(cache, "SLICE", 3)  # rows longer than a slice, rows that share one, empty rows
    load_or_build(tmp_path, KEY, lambda: bundle(rows))
    assert exact(load_or_build(tmp_path, KEY, never).train) == exact(rows)


def test_a_damaged_entry_is_named(tmp_path):
    load_or_build(tmp_path, KEY, lambda: bundle(ROWS))
    [entry] = tmp_path.glob("data-*.pt")
    state = torch.load(entry, weights_only=True)
    state["train"]["columns"]["input_ids"]["lens"][0] += 1  # the lengths no longer add up to the tokens
    torch.save(state, entry)
    with pytest.raises(PeftlabError, match=re.escape(f"data cache: {entry}") + r" is damaged \(its column 'input_ids' does not fit its "
                                           r"4 rows\); delete it and it is built again"):
        load_or_build(tmp_path, KEY, never)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not an entry"])
def test_an_unreadable_entry_is_named_with_the_fix(tmp_path, damage):
    load_or_build(tmp_path, KEY, lambda: bundle(ROWS))
    [entry] = tmp_path.glob("data-*.pt")
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:200])
    elif damage == "garbage":
        entry.write_bytes(b"not a torch file" * 8)
    else:
        torch.save({"rows": [1, 2]}, entry)
    with pytest.raises(PeftlabError, match=re.escape(f"data cache: {entry} is damaged or not a peftlab cache entry (")
                       ) as err:
        load_or_build(tmp_path, KEY, never)
    assert str(err.value).endswith("Delete it and it is built again") and "weights_only" not in str(err.value)
