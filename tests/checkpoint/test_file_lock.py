"""``file_lock`` (peftlab/checkpoint/atomic.py, beside the atomic writes it guards): one holder at a time across
open files (the data cache and the built-in models build once, the others find it built), the lock file created
when missing, released on an error; peftlab.data.cache still offers the same function."""
from __future__ import annotations

import threading
import time

import pytest

from peftlab.checkpoint.atomic import file_lock
from peftlab.data import cache


def test_one_holder_at_a_time_and_released_on_error(tmp_path):
    lock = tmp_path / "entry.lock"
    events: list[str] = []
    inside = threading.Event()

    def holder():
        with file_lock(lock):
            events.append("a in")
            inside.set()
            time.sleep(0.3)
            events.append("a out")

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(5)
    with file_lock(lock):  # its own open file: waits for the holder (flock)
        events.append("b in")
    t.join()
    assert events == ["a in", "a out", "b in"] and lock.is_file()
    with pytest.raises(RuntimeError), file_lock(lock):
        raise RuntimeError("build failed")
    done = threading.Event()

    def taker():
        with file_lock(lock):
            done.set()

    threading.Thread(target=taker, daemon=True).start()
    assert done.wait(5)  # the failed holder let go


def test_the_data_cache_uses_the_same_lock():
    assert cache.file_lock is file_lock
