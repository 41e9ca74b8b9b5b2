"""peftlab.data.cache.load_or_build when the disk refuses the cache: in one process a warning and the data built in
memory (the cache is an optimisation); an error of the build itself is not the cache's and goes on unchanged."""
from __future__ import annotations

import errno
import logging
from types import SimpleNamespace

import pytest

from peftlab.data import cache


def test_a_cache_dir_with_a_file_in_the_way_builds_in_memory_with_one_warning(tmp_path, caplog):
    blocked = tmp_path / "cache"
    blocked.write_text("not a directory")
    built = SimpleNamespace(cache_path=None)
    with caplog.at_level(logging.WARNING, logger="peftlab.data.cache"):
        assert cache.load_or_build(blocked, "k" * 32, lambda: built) is built
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"data cache: could not write in {blocked} (")
    assert "the data is built in memory for this run" in warnings[0] and "PEFTLAB_DATA_CACHE" in warnings[0]


def test_a_full_disk_when_the_entry_is_saved_keeps_the_built_data(tmp_path, caplog, monkeypatch):
    def full(bundle, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache, "_save", full)
    builds: list[int] = []
    built = SimpleNamespace(cache_path=None)

    def build():
        builds.append(1)
        return built

    with caplog.at_level(logging.WARNING, logger="peftlab.data.cache"):
        assert cache.load_or_build(tmp_path / "cache", "k" * 32, build) is built
    assert builds == [1] and built.cache_path is None  # built once, not cached
    assert "(No space left on device): the data is built in memory for this run" in caplog.text


def test_an_error_of_the_build_itself_is_not_the_caches(tmp_path, caplog):
    def build():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "data/train.jsonl")

    with caplog.at_level(logging.WARNING, logger="peftlab.data.cache"), pytest.raises(FileNotFoundError):
        cache.load_or_build(tmp_path / "cache", "k" * 32, build)
    assert "data cache" not in caplog.text
