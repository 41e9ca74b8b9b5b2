"""A disk that starts refusing writes under one folder, for the tests of what a run does then (full disk, a
read-only remount): it patches ``open`` / ``io.open`` for one test only, so it holds whichever way a writer opens
its files (once for the run, or again for every record)."""
from __future__ import annotations

import builtins
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


class FailingDisk:
    """Files opened for writing under ``root`` refuse writes with ``code`` while ``when()`` is true: an already open
    file raises on write/flush as the kernel does (no filename), a new open raises with the filename."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, code: int,
                 when: Callable[[], bool] = lambda: False):
        self.root, self.code, self.when = str(root), code, when
        self.refused = 0
        self.real_open = io.open
        monkeypatch.setattr(io, "open", self.open)
        monkeypatch.setattr(builtins, "open", self.open)

    def fail_now(self) -> None:
        self.when = lambda: True

    def check(self, filename: Any = None) -> None:
        if self.when():
            self.refused += 1
            raise OSError(self.code, os.strerror(self.code), *([filename] if filename is not None else []))

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        name = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
        if not (any(c in mode for c in "wax+") and name.startswith(self.root)):
            return self.real_open(file, mode, *args, **kwargs)
        self.check(file)
        return _Refusing(self.real_open(file, mode, *args, **kwargs), self)


class _Refusing:
    def __init__(self, f: Any, disk: FailingDisk):
        self._f, self._disk = f, disk

    def write(self, data: Any) -> Any:
        self._disk.check()
        return self._f.write(data)

    def flush(self) -> None:
        self._disk.check()
        self._f.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _Refusing:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()
