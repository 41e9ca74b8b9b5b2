"""The one atomic write of peftlab: write beside the target, fsync, rename into place, fsync the directory.

Every file peftlab writes for a user — adapters, checkpoints, merged models, GGUF files, caches, metrics
rewrites, recipes — goes through this module, so a crash, a kill or a full disk at any moment leaves either
the old file or the complete new one under the final name, never a half-written one, and what was renamed
into place survives a power loss (the data and the directory entry are both on disk).

    atomic_write_bytes(path, data)              # bytes
    atomic_write_text(path, text)               # str, UTF-8
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))   # a library that writes to a path
    with atomic_directory(out_dir, overwrite=True) as tmp: ...     # a whole directory, renamed at the end
    with file_lock(path.with_suffix(".lock")): ...  # one process builds a shared file, the others find it built

Temporary names start with ``.`` and end with ``.tmp-<pid>`` beside the target (same filesystem, so the
rename is atomic); they are removed when the write fails.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_write", "atomic_write_bytes", "atomic_write_text", "default_permissions",
           "file_lock", "fsync_dir", "fsync_file", "target_of_temporary", "temporary_name"]


def temporary_name(path: Path) -> Path:
    """The temporary file beside ``path`` a write goes to before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-\d+")  # what temporary_name makes, of any process


def target_of_temporary(path: Path) -> Path | None:
    """The file a :func:`temporary_name` stands in for (``.NAME.tmp-PID`` -> ``NAME`` beside it), else None: a
    message about a refused write names the file being replaced, not a temporary that is gone."""
    temporary = _TEMPORARY.fullmatch(path.name)
    return path.with_name(temporary["name"]) if temporary else None


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], *, fsync: bool = True) -> Path:
    """Call ``write(tmp)`` (it creates the file at ``tmp``), then fsync and rename it to ``path``.

    For libraries that write to a path themselves (safetensors' ``save_file``, gguf's writer). ``fsync=False``
    is for scratch files whose loss only costs a recomputation (never for a user's results).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def default_permissions(path: Path) -> None:
    """The mode a new directory gets (0777 less the umask) for one made by ``tempfile.mkdtemp`` (0700):
    results are shared with the people and services that use them."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``path`` to fill; renamed to ``path`` when the block ends without an error.

    Every file in it is fsynced before the rename. An existing ``path`` is replaced only with ``overwrite``
    (moved aside first, removed after the rename); on an error the temporary directory is removed and an
    existing ``path`` is left as it was.
    """
    from peftlab.errors import PeftlabError

    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())) and not overwrite:
        raise PeftlabError(f"{path} exists and is not empty; choose a new directory or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        default_permissions(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An exclusive lock across processes on this machine (``flock`` on ``path``, created when missing), held
    for the ``with`` block: one process builds what the others then find built."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock, builds may repeat
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
