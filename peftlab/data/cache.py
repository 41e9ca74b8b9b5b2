"""Tokenized-data cache: build once, share with every process of the run and with later runs.

The key is a sha256 over: the cache format version, every ``data:`` setting (except ``num_proc``,
which cannot change the result; a setting added after keys were first written only when it is not at its default:
:data:`KEYED_DATA_FIELDS`), the seed, each source's content hash (file bytes, not mtimes), and
the tokenizer (its full ``tokenizer.json``, special tokens and chat template). A named template is
part of the settings; the tokenizer's own template is part of the tokenizer. The content hashes are
remembered in the cache directory (``file-hashes.json``, :func:`peftlab.data.sources.hash_files`) and
the files read again only when their size, mtime, ctime, inode or device changed.

Who builds: under ``torch.distributed`` rank 0 builds and the others wait at a barrier; otherwise
(several independent processes, e.g. test workers or a second run) an exclusive file lock
serialises builders and late comers find the finished file. Files are written through
:mod:`peftlab.checkpoint.atomic`, so a crash never leaves a half-written cache entry.

The entry is saved with ``torch.save`` and read with ``torch.load(weights_only=True)``, which only
admits plain containers and numbers: a tampered cache file cannot execute code. Its rows are stored by key, as a
few tensors (token lists as one flat tensor and their lengths): that unpickler is pure Python and read a list of
50k Alpaca rows (Llama 3 tokenizer) in 11 s, their columns in 1 s. An entry written as a list of rows is read and
rewritten as columns (:func:`_load`) by whoever reads it and may write: a single process, or rank 0 of a launched run
(the other ranks only read: N ranks rewriting one file is N times the work for the same bytes). The rewrite is an
atomic rename, so a process still reading the old file is unaffected.

Size cap (``data.cache_max_gb``, None by default: nothing is removed): an entry's mtime is its last use — set when it
is written and on every hit (explicitly, as filesystem atimes are often ``noatime`` / ``relatime``) — and after
writing a new entry the writer removes the least recently used others until the entries fit (:func:`evict`). Only
files named as this cache names its entries (:data:`ENTRY`) count and are removed: the file-hash memo, the locks and
anything else in the directory are left alone. The entry just written and those this process has read or written
are never removed; another process that finds its entry removed between seeing and reading it builds it again.
Removing and rewriting entries happens under one directory lock (:data:`DIR_LOCK`); a refused removal (read-only
directory, permissions) is a warning, never a failed run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from peftlab.checkpoint.atomic import atomic_write, file_lock
from peftlab.data.build import DataBundle
from peftlab.data.config import DataConfig
from peftlab.data.stats import DataStats
from peftlab.errors import PeftlabError

# The cache entry's format: bump it when what an entry holds for the same inputs changes (its rows, its fields), so
# that older entries are missed and built again. It is part of the entry's key only: a stream's resume fingerprint
# (:meth:`peftlab.data.streaming.StreamingExamples.fingerprint`) uses :func:`examples_key` with its own version, and
# an in-memory run's hashes its rows, so a bump refuses no resume.
CACHE_VERSION = 1

logger = logging.getLogger(__name__)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # pragma: no cover - slow tokenizers are refused by the encoder anyway
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    return h.hexdigest()


# The data settings every key has always hashed (DataConfig's and DatasetSpec's fields when keys were first written,
# but ``num_proc``). A field added to either later is hashed only when it is set away from its default: a checkpoint
# holds the stream fingerprint (:meth:`peftlab.data.streaming.StreamingExamples.fingerprint`), and a new setting at
# its default must leave it — and the cache entries' keys — as they were, or every streaming resume is refused and
# every cache entry built again although the examples are the same. Do not add a new field here.
KEYED_DATA_FIELDS = frozenset({
    "train", "eval", "eval_split", "template", "train_on", "max_seq_len", "packing", "overlength", "on_bad_rows",
    "system_prompt", "max_samples", "streaming", "mixture", "shuffle", "label_type", "eval_prompts", "shuffle_buffer"})
KEYED_DATASET_FIELDS = frozenset({"path", "format", "split", "fields", "weight", "loss_weight", "name"})
UNKEYED_DATA_FIELDS = frozenset({"num_proc", "cache_max_gb"})  # cannot change the examples


def _keyed_settings(model: BaseModel, keyed: frozenset[str]) -> dict[str, Any]:
    """``model``'s settings as keys hash them: the fields of ``keyed`` always, any other only away from its default
    (fields excluded from dumps, like DataConfig.preference, not at all)."""
    dumped = model.model_dump(mode="json")
    fields_info = type(model).model_fields
    out = {}
    for name, value in dumped.items():
        if name in keyed or name not in fields_info:
            out[name] = value
            continue
        default = fields_info[name].get_default(call_default_factory=True)
        if default is PydanticUndefined or getattr(model, name) != default:
            out[name] = value
    return out


def data_settings(cfg: DataConfig) -> dict[str, Any]:
    """The data settings :func:`examples_key` hashes (see :data:`KEYED_DATA_FIELDS`)."""
    settings = _keyed_settings(cfg, KEYED_DATA_FIELDS)
    for name in UNKEYED_DATA_FIELDS:
        settings.pop(name, None)
    for name in ("train", "eval"):
        if name in settings:
            settings[name] = [_keyed_settings(spec, KEYED_DATASET_FIELDS) for spec in getattr(cfg, name)]
    return settings


def examples_key(cfg: DataConfig, tokenizer: Any, seed: int, fingerprints: list[str], *, version: int) -> str:
    """sha256 over what defines the examples — the data settings (:func:`data_settings`: every one but
    ``num_proc``), the seed, the sources' content ``fingerprints`` and the tokenizer — and ``version``: the format
    of what the caller keys with it."""
    blob = json.dumps({"version": version, "settings": data_settings(cfg), "seed": seed,
                       "sources": fingerprints, "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(cfg: DataConfig, tokenizer: Any, seed: int, fingerprints: list[str]) -> str:
    """The cache entry's key: :func:`examples_key` in the entry format :data:`CACHE_VERSION`."""
    return examples_key(cfg, tokenizer, seed, fingerprints, version=CACHE_VERSION)


def _column(values: list[Any]) -> dict[str, Any]:
    """One key of every row, as ``torch.load(weights_only=True)`` reads fast: token lists as one flat tensor (int32
    where every value fits) and their lengths, int / float scalars as one tensor; anything else (strings, mixed kinds) as the plain list.
    Types are kept exactly (bool is not int, int is not float), so the rows read back equal those written."""
    def every(kind: type) -> bool:
        return all(type(x) is kind for x in values)

    def every_list_of(kind: type) -> bool:
        return all(type(v) is list and all(type(x) is kind for x in v) for v in values)

    try:
        for kind, dtype in ((int, torch.int64), (float, torch.float64)):
            if every(kind):
                return {"scalars": torch.tensor(values, dtype=dtype)}
            if every_list_of(kind):
                flat = torch.tensor([x for v in values for x in v], dtype=dtype)
                if kind is int and flat.numel() and -2**31 <= int(flat.min()) and int(flat.max()) < 2**31:
                    flat = flat.to(torch.int32)  # token ids: half the disk; tolist() gives the same ints back
                return {"flat": flat, "lens": torch.tensor([len(v) for v in values])}
    except (OverflowError, RuntimeError, ValueError):  # an int beyond int64 (torch says so in all three)
        pass
    return {"values": values}


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows (dicts) -> ``{"n", "columns": {key: (rows that have it, :func:`_column`)}}``: a handful of tensors, where
    a list of dicts costs the weights-only unpickler (pure Python) one step per number: 50k Alpaca rows (4.2M
    tokens) took 11 s to read as rows."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns = {}
    for k in keys:
        where = [i for i, r in enumerate(rows) if k in r]
        columns[k] = {"rows": None if len(where) == len(rows) else torch.tensor(where, dtype=torch.int64),
                      **_column([rows[i][k] for i in where])}
    return {"n": len(rows), "columns": columns}


SLICE = 1 << 20  # values of a token column turned into Python ints at a time (all at once would double the memory)


def _split(flat: torch.Tensor, lens: list[int]) -> Iterator[list[Any]]:
    """``flat``'s values as lists of ``lens``, converted a slice of about :data:`SLICE` values at a time."""
    start, k = 0, 0
    while k < len(lens):
        j, end = k + 1, start + lens[k]
        while j < len(lens) and end - start + lens[j] <= SLICE:
            end, j = end + lens[j], j + 1
        part, at = flat[start:end].tolist(), 0
        for n in lens[k:j]:
            yield part[at:at + n]
            at += n
        start, k = end, j


def _rows(table: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """The rows of :func:`_columns`' table (PeftlabError when its columns do not fit together: a damaged entry)."""
    n = table["n"]
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for k, col in table["columns"].items():
        where = range(n) if col["rows"] is None else col["rows"].tolist()
        if "flat" in col:
            lens = col["lens"].tolist()
            fits = len(lens) == len(where) and sum(lens) == col["flat"].numel() and min(lens, default=0) >= 0
            values: Iterable[Any] = _split(col["flat"], lens)
        else:
            values = col["scalars"].tolist() if "scalars" in col else col["values"]
            fits = len(values) == len(where)
        if not fits or (col["rows"] is not None and not all(0 <= i < n for i in where)):
            raise PeftlabError(f"data cache: {path} is damaged (its column {k!r} does not fit its {n} rows); "
                               "delete it and it is built again")
        for i, v in zip(where, values):
            rows[i][k] = v
    return rows


def _to_state(bundle: DataBundle) -> dict[str, Any]:
    state = {f.name: getattr(bundle, f.name) for f in fields(bundle)}
    state["stats"] = bundle.stats.to_dict()
    state["train"] = _columns(list(bundle.train))
    state["eval"] = _columns(list(bundle.eval)) if bundle.eval is not None else None
    return state


def _from_state(state: dict[str, Any], path: Path) -> DataBundle:
    state = dict(state)
    for split in ("train", "eval"):  # entries written before the columns hold a list of rows
        if isinstance(state[split], dict):
            state[split] = _rows(state[split], path)
    state["stats"] = _class_trained_tokens(DataStats.from_dict(state["stats"]), state.get("task", "causal_lm"))
    state.update(from_cache=True, cache_path=str(path))
    return DataBundle(**state)


def _class_trained_tokens(stats: DataStats, task: str) -> DataStats:
    """A classification / regression entry's trained tokens are its input tokens (every row has one ``label``:
    :func:`peftlab.data.build.trained_tokens`), which the entry counts in ``tokens``. Entries written before that
    rule (commit 3e8f7eb) counted 0; setting them here repairs those exactly, where bumping :data:`CACHE_VERSION`
    would re-tokenize every cached dataset (language-modelling ones too, whose entries are right) and leave the old
    entries on disk."""
    if task in ("classification", "regression"):
        for st in stats.datasets:
            st.trained_tokens = st.tokens
        stats.train_trained_tokens = stats.train_tokens
    return stats


def _save(bundle: DataBundle, path: Path) -> None:
    state = _to_state(bundle)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load(path: Path, upgrade: bool = True) -> DataBundle:
    """The entry at ``path``; one written as a list of rows is rewritten as columns (with its statistics repaired),
    so that it is slow to read once only. ``upgrade=False`` for the ranks of a launched run but rank 0, which only
    read. The rewrite holds :data:`DIR_LOCK` and happens only while the entry is still there (an eviction meanwhile
    is not undone); a refused rewrite (read-only or full cache directory) leaves the old entry, which still reads.
    FileNotFoundError (the entry was removed since it was seen) goes on as it is: the caller builds it again."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        bundle = _from_state(state, path)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            OSError) as exc:  # torch's own message would suggest weights_only=False: never for a file from disk
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            first = "it holds more than tensors and plain containers, or is no pickle"
        raise PeftlabError(f"data cache: {path} is damaged or not a peftlab cache entry ({first[:200]}). Delete it "
                           "and it is built again") from None
    if upgrade and not isinstance(state["train"], dict):
        try:
            with file_lock(path.parent / DIR_LOCK):
                if path.is_file():
                    _save(bundle, path)
        except OSError as exc:
            logger.info(f"data cache: {path} is kept in its older, slower form (rewriting it failed: {exc})")
    return bundle


def load_or_build(cache_dir: Path, key: str, build: Callable[[], DataBundle], *,
                  max_gb: float | None = None) -> DataBundle:
    """The cached bundle for ``key``, building (once across processes) on a miss.

    The cache is an optimisation: in one process, a cache directory the disk refuses (full, read-only, a file in the
    way) costs one warning and the data is built in memory; across processes the other ranks read rank 0's file, so
    there a refused write is a :class:`PeftlabError` naming the directory. Errors of the build itself (a missing
    data file) are not the cache's and go on as they are. A hit records the entry's use (its mtime); a new entry is
    followed by :func:`evict` with ``max_gb`` (``data.cache_max_gb``), by the process that wrote it."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"data-{key[:32]}.pt"
    dist = torch.distributed
    launched = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if launched:
            raise _cache_refused(exc, cache_dir, "the other processes need rank 0's file") from None
        logger.warning(f"{_cache_refused(exc, cache_dir, 'the data is built in memory for this run')}")
        return build()
    if launched:
        built, rank0 = None, dist.get_rank() == 0
        if rank0 and not path.is_file():
            built = build()
            try:
                _save(built, path)
            except OSError as exc:
                raise _cache_refused(exc, cache_dir, "the other processes need rank 0's file") from None
            built.cache_path = str(path)
            _using(path)
            evict(cache_dir, path, max_gb)  # the others wait at the barrier; they only read the new entry
        elif rank0:
            try:
                _touch(path, max_gb)
            except FileNotFoundError:  # removed just now: the load below says so
                pass
        dist.barrier()  # everyone past here sees the finished file
        if built is not None:
            return built
        try:
            bundle = _load(path, upgrade=rank0)  # the others read it at once: rank 0 alone rewrites an old entry
        except FileNotFoundError:
            raise PeftlabError(f"data cache: {path} was removed while this run started (another run sharing the "
                               "cache directory evicted it: data.cache_max_gb); start again and it is built") from None
        _using(path)
        return bundle
    if path.is_file():
        bundle = _hit(path, max_gb)
        if bundle is not None:
            return bundle
    stage, bundle = "lock", None
    try:
        with file_lock(cache_dir / f"data-{key[:32]}.lock"):
            if path.is_file():  # another process built it while we waited
                stage = "load"
                bundle = _hit(path, max_gb)
                if bundle is not None:
                    return bundle
            stage = "build"
            bundle = build()
            stage = "save"
            _save(bundle, path)
            _using(path)
            stage = "evict"
            evict(cache_dir, path, max_gb)  # under the builder's lock; refusals are its own warning
    except OSError as exc:
        if stage not in ("lock", "save"):
            raise
        logger.warning(f"{_cache_refused(exc, cache_dir, 'the data is built in memory for this run')}")
        return bundle if bundle is not None else build()
    bundle.cache_path = str(path)
    return bundle


# The entries load_or_build writes (data-<first 32 hex digits of the key>.pt): the only files eviction counts and
# removes. Its temporaries (.data-….pt.tmp-PID), locks, file-hashes.json and any other tool's files never match.
ENTRY = re.compile(r"data-[0-9a-f]{32}\.pt")
DIR_LOCK = "data-cache.lock"  # held to remove or rewrite entries (per-key locks only serialise one key's builders)
GB = 10**9  # data.cache_max_gb's unit, as disk sizes are sold and `df -H` shows them

_in_use: set[Path] = set()  # entries this process read or wrote: its data, never evicted by it
_warned: set[tuple[str, Path]] = set()  # (what, cache directory): warnings given once per process


def _using(path: Path) -> None:
    _in_use.add(path.resolve())


def _warn_once(what: str, cache_dir: Path, message: str) -> None:
    if (what, cache_dir.resolve()) not in _warned:
        _warned.add((what, cache_dir.resolve()))
        logger.warning(message)


def _touch(path: Path, max_gb: float | None) -> None:
    """Record a use of the entry at ``path``: its mtime, the order :func:`evict` removes entries in. Refused (an
    entry of another user, a read-only directory): one warning where a cap is set, as eviction will take it for
    older than it is; nothing otherwise. FileNotFoundError goes on: the entry was removed meanwhile."""
    try:
        os.utime(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if max_gb is not None:
            _warn_once("touch", path.parent, f"data cache: could not record the use of {path} ({exc.strerror or exc})"
                       f"; with data.cache_max_gb set, eviction takes entries read here for older than they are")


def _hit(path: Path, max_gb: float | None) -> DataBundle | None:
    """The entry at ``path``, its use recorded; None when it was removed since it was seen (build it again)."""
    try:
        _touch(path, max_gb)
        bundle = _load(path)
    except FileNotFoundError:
        return None
    _using(path)
    return bundle


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 10**6:.1f} MB" if n >= 10**6 else f"{n} bytes"


def entries(cache_dir: Path) -> list[tuple[int, str, int]]:
    """The cache's entries in ``cache_dir`` (regular files named as :data:`ENTRY`) as ``(mtime_ns, name, size)``,
    least recently used first."""
    out = []
    for name in os.listdir(cache_dir):
        if ENTRY.fullmatch(name):
            try:
                st = os.lstat(cache_dir / name)
            except FileNotFoundError:  # removed meanwhile
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((st.st_mtime_ns, name, st.st_size))
    return sorted(out)


def evict(cache_dir: Path, new: Path, max_gb: float | None) -> list[str]:
    """Remove the least recently used entries of ``cache_dir`` until its entries take at most ``max_gb`` GB
    (None: no cap), never ``new`` (just written) nor one this process uses; the names removed. One info line names
    them and the space freed. When what is kept exceeds the cap alone, one warning (per directory and process).
    Runs under :data:`DIR_LOCK`; a refusal (read-only directory, permissions) is a warning, not an error."""
    if max_gb is None:
        return []
    cap, removed, freed, total, refused = int(max_gb * GB), [], 0, 0, False
    keep = {new.resolve(), *_in_use}
    try:
        with file_lock(cache_dir / DIR_LOCK):
            listed = entries(cache_dir)
            total = sum(size for _, _, size in listed)
            for _, name, size in listed:
                if total <= cap:
                    break
                victim = cache_dir / name
                if victim.resolve() in keep:
                    continue
                try:
                    victim.unlink()
                except FileNotFoundError:  # removed by someone else
                    total -= size
                    continue
                removed.append(name)
                freed += size
                total -= size
    except OSError as exc:
        refused = True
        _warn_once("evict", cache_dir, f"data cache: could not remove old entries of {cache_dir} to keep it under "
                   f"data.cache_max_gb={max_gb:g} ({exc.strerror or exc}); the run goes on, the directory keeps "
                   f"{_size(total)} of entries; make it writable or free space there yourself")
    if removed:
        shown = ", ".join(removed[:8]) + (f" and {len(removed) - 8} more" if len(removed) > 8 else "")
        logger.info(f"data cache: removed {len(removed)} least recently used entr{'y' if len(removed) == 1 else 'ies'}"
                    f" of {cache_dir} ({shown}), freeing {_size(freed)}, to keep it under data.cache_max_gb="
                    f"{max_gb:g}")
    if total > cap and not refused:
        what = (f"the entry just written, {new.name} ({_size(total)}), is" if total == _file_size(new) else
                f"the entries this run uses take {_size(total)},")
        _warn_once("over", cache_dir, f"data cache: in {cache_dir} {what} more than data.cache_max_gb={max_gb:g} "
                   "alone: kept, and every other entry removed; raise data.cache_max_gb to keep more than that")
    return removed


def _cache_refused(exc: OSError, cache_dir: Path, then: str) -> PeftlabError:
    """The message of a cache directory the disk refused (``then``: what happens instead)."""
    why = exc.strerror or str(exc)
    return PeftlabError(f"data cache: could not write in {cache_dir} ({why}): {then}; free space there or point "
                        "PEFTLAB_DATA_CACHE at a writable disk with room (the next start tokenizes again until then)")
