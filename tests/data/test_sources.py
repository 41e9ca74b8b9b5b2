"""Sources: JSON, JSONL, Parquet, CSV, directories, save_to_disk directories, hub ids (offline)."""
from __future__ import annotations

import csv
import gzip
import json

import pytest

from peftlab.data.config import DatasetSpec
from peftlab.data.sources import Source, UnreadableRow
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


def test_bad_json_line_is_an_unreadable_row_naming_the_line(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "a"}\n{"text": \n{"text": "c"}\n')
    rows = list(Source(DatasetSpec(path=str(tmp_path / "b.jsonl"))))
    assert [r.where.rsplit("/", 1)[1] for r in rows] == ["b.jsonl:1", "b.jsonl:2", "b.jsonl:3"]
    assert isinstance(rows[1].data, UnreadableRow) and rows[1].data.problem.startswith("not valid JSON")
    assert rows[2].data == {"text": "c"}


def test_non_utf8_byte_names_line_and_byte_offset(tmp_path):
    """A Latin-1 byte in a JSONL line: that line is unreadable (file:line, the byte, its offset), the rest reads."""
    raw = b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n{"text": "fine"}\n'
    (tmp_path / "l.jsonl").write_bytes(raw)
    rows = list(Source(DatasetSpec(path=str(tmp_path / "l.jsonl"))))
    assert rows[1].where.endswith("l.jsonl:3") and isinstance(rows[1].data, UnreadableRow)
    assert raw.index(0xE9) == 29
    assert rows[1].data.problem == "not UTF-8 text (byte 0xe9 at byte offset 29 of the file)"
    assert "re-encode the file as UTF-8" in rows[1].data.fix
    assert [r.data for r in (rows[0], rows[2])] == [{"text": "ok"}, {"text": "fine"}]
    # gzip: the offset is in the uncompressed data
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(raw))
    bad = list(Source(DatasetSpec(path=str(tmp_path / "g.jsonl.gz"))))[1].data
    assert bad.problem == "not UTF-8 text (byte 0xe9 at byte offset 29 of the uncompressed data)"
    # a CSV record is unreadable on its own; the other records read
    (tmp_path / "c.csv").write_bytes(b"text,label\nok,a\ncaf\xe9,b\nfine,c\n")
    rows = list(Source(DatasetSpec(path=str(tmp_path / "c.csv"))))
    assert rows[1].where.endswith("c.csv:3") and rows[1].data.problem == "not UTF-8 text (byte 0xe9 in this record)"
    assert [rows[0].data, rows[2].data] == [{"text": "ok", "label": "a"}, {"text": "fine", "label": "c"}]
    # one JSON document has no smaller unit to skip: an error naming file:line and the offset
    (tmp_path / "a.json").write_bytes(b'[{"text": "ok"},\n {"text": "caf\xe9"}]')
    with pytest.raises(PeftlabError, match=r"a\.json:2: not UTF-8 text \(byte 0xe9 at byte offset 31 of the file\); "
                                           "re-encode the file as UTF-8"):
        list(Source(DatasetSpec(path=str(tmp_path / "a.json"))))
    # ... but JSON Lines named .json are read line by line
    (tmp_path / "l.json").write_bytes(raw)
    assert isinstance(list(Source(DatasetSpec(path=str(tmp_path / "l.json"))))[1].data, UnreadableRow)


def test_byte_order_mark_is_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "b.json").write_bytes(bom + b'[{"text": "a"}]')
    (tmp_path / "b.csv").write_bytes(bom + b"text,label\na,x\n")
    assert [r.data for r in Source(DatasetSpec(path=str(tmp_path / "b.jsonl")))] == [{"text": "a"}, {"text": "b"}]
    assert [r.data for r in Source(DatasetSpec(path=str(tmp_path / "b.json")))] == [{"text": "a"}]
    assert [r.data for r in Source(DatasetSpec(path=str(tmp_path / "b.csv")))] == [{"text": "a", "label": "x"}]


def test_fingerprint_follows_content(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a"}\n')
    f1 = Source(DatasetSpec(path=str(p))).fingerprint()
    p.write_text('{"text": "b"}\n')
    assert Source(DatasetSpec(path=str(p))).fingerprint() != f1
