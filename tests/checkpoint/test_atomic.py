"""The one atomic write (peftlab.checkpoint.atomic): the target is the old file or the whole new one, never a
part; temporary files are gone after a failure; a directory is replaced only when asked and stays as it was
when filling its replacement fails."""
from __future__ import annotations

import os

import pytest

from peftlab.checkpoint.atomic import atomic_directory, atomic_write, atomic_write_bytes, atomic_write_text
from peftlab.errors import PeftlabError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    atomic_write_text(target, "néw")
    assert target.read_bytes() == "néw".encode() and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("2")
    assert (target / "sub" / "b.txt").read_text() == "2"
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~mask  # not mkdtemp's 0700
    with pytest.raises(PeftlabError, match="exists and is not empty; choose a new directory or pass --overwrite"), \
            atomic_directory(target):
        pass
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("changed")
        raise RuntimeError("failed while filling it")
    assert (target / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "model"]
