"""Where rows come from: local JSON / JSONL / Parquet / CSV files and directories of them,
``datasets.save_to_disk`` directories, and ``datasets`` hub ids.

Every row carries its location (``file:line`` for JSONL/CSV, ``file:row N`` for JSON arrays and
Parquet) so that a bad row can be reported where the user can find it. Rows are produced lazily:
in streaming mode nothing holds more than one Parquet batch in memory.

Text files must be UTF-8 (a leading byte-order mark is accepted). A JSONL line or CSV record that
cannot be read (bytes that are not UTF-8, a JSONL line that is not JSON) comes out as a row whose
``data`` is an :class:`UnreadableRow`, so that ``data.on_bad_rows`` applies to it like to any bad row.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.data.config import DatasetSpec
from peftlab.errors import PeftlabError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class UnreadableRow:
    """A line that could not be read: ``problem`` says why, ``fix`` how to repair the file."""

    problem: str
    fix: str


RECODE_HINT = "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT` for Latin-1 text)"


@dataclass
class Row:
    """One source row: its 0-based index within the dataset, the raw mapping, and where it is."""

    index: int
    data: Any
    where: str


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in FILE_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _open_text(path: Path, errors: str = "strict") -> io.TextIOBase:
    # utf-8-sig: a byte-order mark (spreadsheet exports) would otherwise become part of the first column name
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors=errors, newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8-sig", errors=errors, newline="")


def _open_bytes(path: Path) -> io.BufferedIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _not_utf8(err: UnicodeDecodeError, offset: int, path: Path) -> str:
    """One wording for a non-UTF-8 byte: its value and its byte offset in the file (0-based)."""
    byte = err.object[err.start:err.start + 1].hex()
    where = "of the uncompressed data" if path.name.lower().endswith(".gz") else "of the file"
    return f"not UTF-8 text (byte 0x{byte} at byte offset {offset} {where})"


_SURROGATE = re.compile("[\udc80-\udcff]")


def hash_files(paths: list[Path]) -> str:
    """sha256 over the content of ``paths`` (and their names): the cache key's view of the data."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class Source:
    """One ``DatasetSpec`` resolved to files (or a ``datasets`` object) and iterable as rows."""

    def __init__(self, spec: DatasetSpec, base_dir: Path | None = None, *, streaming: bool = False):
        self.spec = spec
        self.streaming = streaming
        self.files: list[Path] = []
        self.kind = "files"
        raw = os.path.expanduser(spec.path)
        path = Path(raw)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        self.path = path
        if path.is_file():
            self._check_suffix(path)
            self.files = [path]
        elif path.is_dir():
            if any((path / m).is_file() for m in _DISK_MARKERS):
                self.kind = "disk"
                self.files = sorted(p for p in path.rglob("*") if p.is_file())
            else:
                self.files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in FILE_SUFFIXES)
                if not self.files:
                    raise PeftlabError(
                        f"data: directory {path} has no data files ({', '.join(FILE_SUFFIXES)}) and is not a "
                        "`datasets.save_to_disk` directory; point `path` at a file or a folder of them"
                    )
        elif _looks_like_hub_id(spec.path):
            self.kind = "hub"
        else:
            raise PeftlabError(
                f"data: {spec.path!r} not found (resolved to {path}); give an existing file or directory "
                "(relative paths are relative to the recipe file) or a hub id like `tatsu-lab/alpaca`"
            )

    @staticmethod
    def _check_suffix(path: Path) -> None:
        if _suffix(path) not in FILE_SUFFIXES:
            raise PeftlabError(
                f"data: cannot read {path}: unknown file type {path.suffix!r}; supported: "
                f"{', '.join(FILE_SUFFIXES)}"
            )

    def fingerprint(self) -> str:
        """Content hash of the files; for hub datasets the id, split and the dataset's own fingerprint."""
        if self.kind == "hub":
            return hashlib.sha256(f"hub:{self.spec.path}:{self.spec.split}".encode()).hexdigest()
        return hash_files(self.files)

    def __iter__(self) -> Iterator[Row]:
        if self.kind == "hub":
            yield from self._iter_datasets(self._load_hub(), self.spec.path)
            return
        if self.kind == "disk":
            yield from self._iter_datasets(self._load_disk(), str(self.path))
            return
        index = 0
        for f in self.files:
            for row in self._iter_file(f):
                row.index = index
                index += 1
                yield row

    # ---- files ----
    def _iter_file(self, f: Path) -> Iterator[Row]:
        suffix = _suffix(f)
        if suffix in (".jsonl", ".jsonl.gz"):
            yield from _iter_jsonl(f)
        elif suffix in (".json", ".json.gz"):
            yield from _iter_json(f)
        elif suffix in (".csv", ".csv.gz"):
            yield from _iter_csv(f)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            n = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    n += 1
                    yield Row(n - 1, rec, f"{f}:row {n}")

    # ---- datasets ----
    def _load_disk(self) -> Any:
        import datasets

        obj = datasets.load_from_disk(str(self.path))
        if isinstance(obj, datasets.DatasetDict):
            if self.spec.split not in obj:
                raise PeftlabError(
                    f"data: {self.path} has splits {sorted(obj)}, not {self.spec.split!r}; set `split:`"
                )
            obj = obj[self.spec.split]
        return obj

    def _load_hub(self) -> Any:
        import datasets

        offline = any(os.environ.get(k, "0") not in ("0", "", "false", "False")
                      for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (f"no local file or directory {self.path} exists, so it was taken as a hub id; no network is "
                "available here (or HF_HUB_OFFLINE is set): download it where a network exists "
                "(`datasets.load_dataset(...).save_to_disk(DIR)`) and set `path: DIR`")
        if offline:
            raise PeftlabError(f"data: cannot load hub dataset {self.spec.path!r}: {hint}")
        try:
            return datasets.load_dataset(self.spec.path, split=self.spec.split, streaming=self.streaming)
        except Exception as e:  # network errors come in many types
            raise PeftlabError(f"data: cannot load hub dataset {self.spec.path!r} "
                               f"(split {self.spec.split!r}): {e}; {hint}") from e

    @staticmethod
    def _iter_datasets(ds: Any, label: str) -> Iterator[Row]:
        for i, rec in enumerate(ds):
            yield Row(i, rec, f"{label}:row {i + 1}")


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not s.startswith((".", "~")) and not any(
        s.lower().endswith(x) for x in FILE_SUFFIXES
    )


def _iter_jsonl(f: Path) -> Iterator[Row]:
    # bytes, decoded line by line: a bad byte spoils its own line only, and its offset is known
    with _open_bytes(f) as fh:
        n = offset = 0
        for lineno, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            rec: Any
            try:
                rec = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))  # columns count on the line itself
            except UnicodeDecodeError as e:
                rec = UnreadableRow(_not_utf8(e, start + e.start, f), RECODE_HINT)
            except json.JSONDecodeError as e:
                rec = UnreadableRow(f"not valid JSON ({e.msg} at column {e.colno})",
                                    "fix the line: each line of a .jsonl file must be one JSON object")
            yield Row(n, rec, f"{f}:{lineno}")
            n += 1


def _iter_csv(f: Path) -> Iterator[Row]:
    # surrogateescape keeps a non-UTF-8 byte as a lone surrogate, so one bad record does not stop the file
    with _open_text(f, errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        for i, rec in enumerate(reader):
            bad = next((v for v in rec.values() if isinstance(v, str) and _SURROGATE.search(v)), None)
            data: Any = dict(rec)
            if bad is not None:
                byte = ord(_SURROGATE.search(bad).group()) - 0xDC00  # type: ignore[union-attr]
                data = UnreadableRow(f"not UTF-8 text (byte 0x{byte:02x} in this record)", RECODE_HINT)
            yield Row(i, data, f"{f}:{reader.line_num}")


def _iter_json(f: Path) -> Iterator[Row]:
    # one document: read whole, so the absolute offset of a bad byte comes straight from the decoder
    with _open_bytes(f) as fh:
        raw = fh.read()
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    bad_byte: str | None = None
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw.count(b"\n", 0, at) + 1
        bad_byte = f"{f}:{line}: {_not_utf8(e, at, f)}; {RECODE_HINT}"
        text = raw[skip:].decode("utf-8", errors="surrogateescape")  # still tell JSON Lines apart
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json suffix (read line by line: bad lines are rows)
            yield from _iter_jsonl(f)
            return
        raise PeftlabError(bad_byte or f"{f}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if bad_byte is not None:  # one JSON document: nothing smaller than the file to skip
        raise PeftlabError(bad_byte)
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} wrappers are common; anything else is a single row
        wrapped = [obj[k] for k in ("data", "train", "rows", "examples") if isinstance(obj.get(k), list)]
        obj = wrapped[0] if len(wrapped) == 1 and len(obj) == 1 else [obj]
    if not isinstance(obj, list):
        raise PeftlabError(f"{f}: expected a JSON array of objects (or JSON Lines), got {type(obj).__name__}")
    for i, rec in enumerate(obj):
        yield Row(i, rec, f"{f}:row {i + 1}")
