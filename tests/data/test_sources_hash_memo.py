"""The data files' digest is remembered in the data cache directory (``file-hashes.json``): a start reads the files
again only when their size, mtime, ctime, inode or device changed, or when the memo is missing or damaged."""
from __future__ import annotations

import builtins
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftlab.data import sources
from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.data.sources import HASH_MEMO, hash_files
from peftlab.model.builtin import build_tokenizer

ROWS = "".join(json.dumps({"text": f"row {k} " + "z " * (k % 4)}) + "\n" for k in range(12))


@pytest.fixture
def reads(monkeypatch) -> dict[str, int]:
    """Opens of each file by peftlab.data.sources (hashing and reading rows), by name."""
    counts: dict[str, int] = {}

    def counting_open(file, *args, **kwargs):
        name = Path(file).name
        counts[name] = counts.get(name, 0) + 1
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(sources, "open", counting_open, raising=False)
    return counts


@pytest.fixture
def settled(monkeypatch) -> None:
    """Files written by the test count as settled at once (the 2 s racy window would otherwise wait for them)."""
    monkeypatch.setattr(sources, "RACY_WINDOW_NS", 0)


def plain_digest(path: Path) -> str:
    return hashlib.sha256(path.name.encode() + path.read_bytes()).hexdigest()


def test_an_unchanged_file_is_read_once(tmp_path, reads, settled):
    data = tmp_path / "t.jsonl"
    data.write_text(ROWS)
    first = hash_files([data], tmp_path / "cache")
    assert reads["t.jsonl"] == 1 and (tmp_path / "cache" / HASH_MEMO).is_file()
    assert hash_files([data], tmp_path / "cache") == first == plain_digest(data)  # the digest it always was
    assert reads["t.jsonl"] == 1


def test_a_rewrite_of_the_same_size_is_read_again(tmp_path, reads, settled):
    data = tmp_path / "t.jsonl"
    data.write_text(ROWS)
    before = hash_files([data], tmp_path / "cache")
    st = data.stat()
    data.write_text(ROWS.replace("row 1 ", "row 9 "))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert data.stat().st_size == st.st_size
    after = hash_files([data], tmp_path / "cache")
    assert reads["t.jsonl"] == 2 and after != before and after == plain_digest(data)


def test_a_rewrite_that_puts_the_old_mtime_back_is_read_again(tmp_path, reads, settled):
    data = tmp_path / "t.jsonl"
    data.write_text(ROWS)
    before = hash_files([data], tmp_path / "cache")
    st = data.stat()
    # rewritten until the kernel's timestamp clock has ticked past the first write's ctime (its tick is the
    # filesystem's and the kernel's, commonly 1-10 ms, up to 2 s on FAT), so the ctime the rewrite sets is a new one
    deadline = time.monotonic() + 3.0
    while True:
        data.write_text(ROWS.replace("row 1 ", "row 9 "))
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p / rsync -t / touch -r do
        if data.stat().st_ctime_ns != st.st_ctime_ns:
            break
        if time.monotonic() > deadline:
            pytest.skip(f"the ctime of {data} did not change within 3 s of rewrites: this filesystem's timestamp "
                        "clock is too coarse to tell a rewrite that keeps size and mtime")
        time.sleep(0.01)
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert hash_files([data], tmp_path / "cache") == plain_digest(data) != before
    assert reads["t.jsonl"] == 2


def clock_at(monkeypatch, ns: int) -> None:
    """peftlab.data.sources reads the time as ``ns`` (its own ``time`` only: the test's wall time does not matter)."""
    monkeypatch.setattr(sources, "time", SimpleNamespace(time_ns=lambda: ns))


def test_a_file_written_just_now_is_not_remembered(tmp_path, reads, monkeypatch):
    data = tmp_path / "t.jsonl"
    data.write_text(ROWS)  # a write within the window could share its timestamps with the next one
    written = max(data.stat().st_mtime_ns, data.stat().st_ctime_ns)
    clock_at(monkeypatch, written + sources.RACY_WINDOW_NS - 1)  # hashed just inside the window
    assert hash_files([data], tmp_path / "cache") == hash_files([data], tmp_path / "cache") == plain_digest(data)
    assert reads["t.jsonl"] == 2 and not (tmp_path / "cache" / HASH_MEMO).exists()
    clock_at(monkeypatch, written + sources.RACY_WINDOW_NS + 1)  # once the window has passed it is remembered
    assert hash_files([data], tmp_path / "cache") == hash_files([data], tmp_path / "cache") == plain_digest(data)
    assert reads["t.jsonl"] == 3 and (tmp_path / "cache" / HASH_MEMO).is_file()


def test_a_file_whose_mtime_is_within_the_window_is_not_remembered(tmp_path, reads, monkeypatch):
    """The window is read from the mtime as well as the ctime: a file stamped with a recent (here: future) mtime
    could share it with its next rewrite, so it is not remembered though its ctime is old enough."""
    data = tmp_path / "t.jsonl"
    data.write_text(ROWS)
    changed = data.stat().st_ctime_ns
    os.utime(data, ns=(changed, changed + 10 * sources.RACY_WINDOW_NS))  # mtime set ahead (touch -d, an archive)
    changed = data.stat().st_ctime_ns  # utime moved the ctime to now
    clock_at(monkeypatch, changed + sources.RACY_WINDOW_NS + 1)  # the ctime is outside the window, the mtime not
    assert hash_files([data], tmp_path / "cache") == plain_digest(data)
    assert not (tmp_path / "cache" / HASH_MEMO).exists()


@pytest.mark.parametrize("memo", [
    b"\x00\xff not json",
    b"[" * 100_000,
    b"[]",
    b'{"version": 1, "entries": []}',
    b'{"version": 2, "entries": {}}',
    "bad-entry",
    "wrong-version",
], ids=["bytes", "deep", "list", "entries-list", "version-2", "bad-entry", "wrong-version"])
def test_a_damaged_memo_is_ignored_and_replaced(tmp_path, reads, settled, memo):
    data = tmp_path / "t.jsonl"
    data.write_text(ROWS)
    cache = tmp_path / "cache"
    cache.mkdir()
    key = f"{socket.gethostname()}\n{os.path.abspath(data)}"  # the key hash_files uses: host, then the paths
    st = data.stat()
    states = [[st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]]
    wrong = "0" * 64  # a digest the memo must not be trusted for: each case below is malformed somewhere
    if memo == "bad-entry":  # the files' states right, the digest not a sha256
        memo = json.dumps({"version": 1, "entries": {key: {"files": states, "sha256": "zz" + wrong[2:],
                                                           "at": 1}}}).encode()
    elif memo == "wrong-version":
        memo = json.dumps({"version": 0, "entries": {key: {"files": states, "sha256": wrong, "at": 1}}}).encode()
    (cache / HASH_MEMO).write_bytes(memo)
    assert hash_files([data], cache) == plain_digest(data)
    assert reads["t.jsonl"] == 1
    assert hash_files([data], cache) == plain_digest(data)  # the memo was written anew and is used
    assert reads["t.jsonl"] == 1


def test_a_start_reads_unchanged_data_files_no_more(tmp_path, reads, settled):
    (tmp_path / "t.jsonl").write_text(ROWS)
    tok = build_tokenizer()
    cfg = DataConfig(train=["t.jsonl"], max_seq_len=32)
    first = build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert reads["t.jsonl"] == 2  # hashed for the cache key, then read for its rows
    again = build_data(cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert again.from_cache and again.train == first.train
    assert reads["t.jsonl"] == 2  # the cache key came from the memo, the rows from the cache
    stream_cfg = cfg.model_copy(update={"streaming": True})
    stream = build_data(stream_cfg, tok, seed=0, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    fingerprint = stream.train.fingerprint()  # what a (resumed) run compares at its start
    assert reads["t.jsonl"] == 2
    assert fingerprint == build_data(stream_cfg, tok, seed=0, base_dir=tmp_path).train.fingerprint()
    assert reads["t.jsonl"] == 3  # without a cache directory: read to hash, the same digest


def test_each_host_remembers_its_own_digest(tmp_path, reads, settled, monkeypatch):
    """A cache directory shared between nodes: each host keeps its entry (their inode and device numbers differ), so
    neither re-hashes at every start, and one host's entry is never taken for another's."""
    data = tmp_path / "t.jsonl"
    data.write_text(ROWS)
    for host in ("node-a", "node-b", "node-a", "node-b"):
        monkeypatch.setattr(sources.socket, "gethostname", lambda host=host: host)
        assert hash_files([data], tmp_path / "cache") == plain_digest(data)
    assert reads["t.jsonl"] == 2  # once per host
    entries = json.loads((tmp_path / "cache" / HASH_MEMO).read_text())["entries"]
    assert sorted(k.split("\n")[0] for k in entries) == ["node-a", "node-b"]
