"""Sources: JSON, JSONL, Parquet, CSV, directories, save_to_disk directories, hub ids (offline)."""
from __future__ import annotations

import csv
import json

import pytest

from peftlab.data.config import DatasetSpec
from peftlab.data.sources import Source
from peftlab.errors import PeftlabError

ROWS = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(5)]


def rows_of(src: Source) -> list[tuple[int, dict, str]]:
    return [(r.index, dict(r.data), r.where) for r in src]


def test_json_jsonl_parquet_csv_give_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    for suffix, where in [("json", "a.json:row 3"), ("jsonl", "a.jsonl:3"), ("parquet", "a.parquet:row 3"),
                          ("csv", "a.csv:4")]:
        got = rows_of(Source(DatasetSpec(path=f"a.{suffix}"), tmp_path))
        assert [g[1] for g in got] == ROWS, suffix
        assert [g[0] for g in got] == list(range(5))
        assert got[2][2].endswith(where), (suffix, got[2][2])


def test_json_wrapper_and_jsonl_named_json(tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"data": ROWS}))
    assert [r.data for r in Source(DatasetSpec(path=str(tmp_path / "w.json")))] == ROWS
    (tmp_path / "l.json").write_text("\n".join(json.dumps(r) for r in ROWS))
    assert [r.data for r in Source(DatasetSpec(path=str(tmp_path / "l.json")))] == ROWS
    single = {"messages": [{"role": "user", "content": "x"}]}
    (tmp_path / "s.json").write_text(json.dumps(single))
    assert [r.data for r in Source(DatasetSpec(path=str(tmp_path / "s.json")))] == [single]


def test_directory_reads_files_in_order_with_global_row_index(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[3:]))
    (d / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:3]))
    (d / "README.md").write_text("ignored")
    got = rows_of(Source(DatasetSpec(path="shards"), tmp_path))
    assert [g[1] for g in got] == ROWS and [g[0] for g in got] == list(range(5))
    assert got[3][2].endswith("b.jsonl:1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PeftlabError, match="has no data files"):
        Source(DatasetSpec(path=str(empty)))


def test_save_to_disk_directory(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])})
    dd.save_to_disk(str(tmp_path / "disk"))
    assert [r.data for r in Source(DatasetSpec(path=str(tmp_path / "disk")))] == ROWS
    assert len(list(Source(DatasetSpec(path=str(tmp_path / "disk"), split="test")))) == 2
    with pytest.raises(PeftlabError, match=r"splits \['test', 'train'\], not 'dev'"):
        list(Source(DatasetSpec(path=str(tmp_path / "disk"), split="dev")))


def test_missing_path_unknown_suffix_hub_offline(tmp_path, monkeypatch):
    with pytest.raises(PeftlabError, match="not found .* relative to the recipe file"):
        Source(DatasetSpec(path="./nope.jsonl"), tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(PeftlabError, match="unknown file type '.txt'"):
        Source(DatasetSpec(path="x.txt"), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = Source(DatasetSpec(path="tatsu-lab/alpaca"), tmp_path)
    assert src.kind == "hub"
    with pytest.raises(PeftlabError, match="cannot load hub dataset 'tatsu-lab/alpaca'.*save_to_disk"):
        list(src)


def test_bad_json_line_names_the_line(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(PeftlabError, match=r"b\.jsonl:2: not valid JSON"):
        list(Source(DatasetSpec(path=str(tmp_path / "b.jsonl"))))


def test_fingerprint_follows_content(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a"}\n')
    f1 = Source(DatasetSpec(path=str(p))).fingerprint()
    p.write_text('{"text": "b"}\n')
    assert Source(DatasetSpec(path=str(p))).fingerprint() != f1
