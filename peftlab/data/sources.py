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
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.checkpoint.atomic import atomic_write_text, file_lock
from peftlab.data.config import DatasetSpec
from peftlab.errors import PeftlabError

logger = logging.getLogger(__name__)

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


def hash_files(paths: list[Path], memo_dir: Path | None = None) -> str:
    """sha256 over the content of ``paths`` (and their names): the cache key's view of the data.

    With ``memo_dir`` (the data cache directory) a digest is remembered in ``memo_dir/file-hashes.json`` beside
    the files' stat (see :func:`file_states`) and given again without reading them while none of it changed: a
    run's start no longer reads gigabytes to find the data as it was. The digest is the same either way.
    """
    if memo_dir is None:
        return _hash_contents(paths)
    memo = Path(memo_dir) / HASH_MEMO
    # per host: on a cache directory shared between nodes (NFS) inode and device numbers differ from node to node,
    # so one entry for all would flip between them and every node would re-hash at every start
    key = "\n".join([socket.gethostname(), *(os.path.abspath(p) for p in paths)])
    started = time.time_ns()
    before = file_states(paths)
    known = _read_memo(memo).get(key)
    if known is not None and known["files"] == before:
        return known["sha256"]
    digest = _hash_contents(paths)
    # remembered only when the files held still while read and their timestamps are older than the window a
    # later write could share (git's "racily clean" rule): such a write then shows as a newer mtime or ctime
    if file_states(paths) == before and all(max(st[1], st[2]) < started - RACY_WINDOW_NS for st in before):
        _remember(memo, key, before, digest)
    return digest


HASH_MEMO = "file-hashes.json"
RACY_WINDOW_NS = 2_000_000_000  # coarser than any timestamp clock in use (FAT: 2 s, HFS+: 1 s, Linux: ~ms)
MEMO_ENTRIES = 256              # sources remembered per cache directory (the oldest forgotten first)


def file_states(paths: list[Path]) -> list[list[int]]:
    """What says a file is unchanged without reading it: size, mtime and ctime (ns), inode and device.

    ctime is in because no tool can set it: a rewrite that keeps the size and puts the old mtime back (``cp -p``,
    ``rsync -t``, ``touch -r``) still moves it; the inode and device change when another file takes the path.
    """
    states = []
    for p in paths:
        st = os.stat(p)
        states.append([st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    return states


def _hash_contents(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_memo(memo: Path) -> dict[str, dict[str, Any]]:
    """The remembered digests; a missing, unreadable or damaged file, or a malformed entry, remembers nothing."""
    try:
        memo_data = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    entries = memo_data.get("entries") if isinstance(memo_data, dict) and memo_data.get("version") == 1 else None
    if not isinstance(entries, dict):
        return {}
    return {k: e for k, e in entries.items() if isinstance(e, dict) and _valid_entry(e)}


def _valid_entry(e: dict[str, Any]) -> bool:
    sha, files, at = e.get("sha256"), e.get("files"), e.get("at")
    return (isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha) is not None and isinstance(at, int)
            and isinstance(files, list) and all(isinstance(f, list) and len(f) == 5
                                                and all(type(x) is int for x in f) for f in files))


def _remember(memo: Path, key: str, states: list[list[int]], digest: str) -> None:
    """Add one digest to the memo: under a lock (another process of the run may add its own), written atomically.
    A memo that cannot be written costs the next start a re-hash, nothing else: it is not an error."""
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(memo.with_name(memo.name + ".lock")):
            entries = _read_memo(memo)
            entries[key] = {"files": states, "sha256": digest, "at": time.time_ns()}
            keep = sorted(entries, key=lambda k: entries[k]["at"])[-MEMO_ENTRIES:]
            atomic_write_text(memo, json.dumps({"version": 1, "entries": {k: entries[k] for k in keep}}),
                              fsync=False)
    except OSError as e:
        logger.debug(f"data: could not remember the data files' hash in {memo}: {e}")


class Source:
    """One ``DatasetSpec`` resolved to files (or a ``datasets`` object) and iterable as rows."""

    def __init__(self, spec: DatasetSpec, base_dir: Path | None = None, *, streaming: bool = False,
                 hash_memo: Path | None = None):
        self.spec = spec
        self.streaming = streaming
        self.hash_memo = hash_memo  # where fingerprint() remembers the files' digest (the data cache directory)
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
        """Content hash of the files (read only when ``hash_memo`` has no digest of them as they are now, see
        :func:`hash_files`); for hub datasets the id and split."""
        if self.kind == "hub":
            return hashlib.sha256(f"hub:{self.spec.path}:{self.spec.split}".encode()).hexdigest()
        return hash_files(self.files, self.hash_memo)

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
