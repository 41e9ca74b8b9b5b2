"""The checkpoint store: atomic checkpoint directories on disk, verified on load, safe to read.

One checkpoint is a directory ``<output.dir>/<checkpoint.dir>/step-0000040/``::

    adapter/adapter_model.safetensors   LoRA weights, PEFT format (the only weights file; safetensors)
    adapter/adapter_config.json         PEFT LoraConfig
    engine.pt          optimizer + scheduler (+ gradient scaler) state; torch.save, read weights_only
    rng.pt             python / numpy / torch CPU / torch CUDA generator states; read weights_only
    trainer_state.json step, epoch, sampler position, counters, guard history, data fingerprint
    recipe.yaml        the resolved recipe of the run
    COMPLETE           written last: {file: size, sha256} of every file above

Write protocol (a crash or a full disk at any moment leaves every earlier checkpoint intact and never
a directory that looks complete but is not), through :mod:`peftlab.checkpoint.atomic`:

1. every file is written into a temporary directory beside the checkpoint (``.step-0000040.tmp-*``) and
   fsynced, with every directory in it;
2. the directory is renamed to ``step-0000040`` (a stale directory of that name is moved aside first);
3. ``COMPLETE`` is written (temp file, fsync, rename) — a directory without it is not a checkpoint;
4. rotation keeps the newest ``keep_last`` complete checkpoints and removes leftovers of crashed saves.

On resume every file is checked against the sizes and SHA-256 digests in ``COMPLETE``, so a truncated
or bit-rotten checkpoint is skipped (``resume: auto``) or refused (``resume: PATH``). Pickle-based files
are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.

What a training run puts into a checkpoint is :mod:`peftlab.checkpoint.save`; reading it back and resuming,
:mod:`peftlab.checkpoint.resume`. The fault-tolerance tests kill a real run at the named points of a save
(``save-N-file-K``, ``save-N-renamed``, ``save-N-done``) through :mod:`peftlab.trainer.fault_injection`.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from peftlab.adapters.peft_format import adapter_config, lora_state_dict
from peftlab.checkpoint.atomic import atomic_directory, atomic_write, fsync_dir
from peftlab.errors import PeftlabError
from peftlab.trainer.fault_injection import kill_point

MARKER = "COMPLETE"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^step-(\d{7,})$")
_LEFTOVER_RE = re.compile(r"^(\.step-\d{7,}\.(tmp|old)-|\.(tmp|trash)-step-\d{7,}-)")

def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_step(path: Path) -> int | None:
    m = _NAME_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_interrupted_write(path: Path) -> bool:
    """A leftover of a save that was killed: the temporary directory of :func:`write_checkpoint` (``.step-N.tmp-*``),
    a replaced one moved aside (``.step-N.old-*``), or one of the layout before checkpoint.atomic
    (``.tmp-step-N-<pid>``, ``.trash-step-N-<pid>``)."""
    return _LEFTOVER_RE.match(path.name) is not None


def safe_subpath(root: Path, sub: str | os.PathLike[str], *, what: str) -> Path:
    """``root / sub``, refused when it would land outside ``root`` (``..``, absolute paths, symlinks)."""
    target = (root / sub).resolve()
    if not target.is_relative_to(root.resolve()):
        raise PeftlabError(f"{what}={str(sub)!r} points outside {root}; peftlab only writes inside the "
                           "output directory — use a relative folder name such as 'checkpoints'")
    return target


# ---- writes (every byte of a checkpoint goes through write_file; renames through checkpoint.atomic) -------


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` (fsynced by the atomic write or directory it is part of)."""
    with open(path, "wb") as f:
        f.write(data)


def probe_writable(directory: Path) -> None:
    """Write, fsync and remove a small file in ``directory``: raises the OSError a real write would get
    (read-only filesystem, permissions, full disk) before a run has done any work."""
    probe = directory / f".peftlab-write-test-{os.getpid()}"
    try:
        atomic_write(probe, lambda tmp: write_file(tmp, b"peftlab\n"))
    finally:
        probe.unlink(missing_ok=True)


# errno -> what the user can do about it (messages of every write into output.dir)
_STORAGE_FIXES = {
    errno.ENOSPC: "free disk space, or choose an output.dir on a disk with room",
    errno.EDQUOT: "free space within your disk quota, or choose an output.dir elsewhere",
    errno.EROFS: "the filesystem is mounted read-only: remount it read-write, or choose an output.dir on a "
                 "writable disk",
    errno.EACCES: "this user may not write there: fix its permissions (chmod / chown), or choose another "
                  "output.dir",
    errno.EPERM: "this user may not write there: fix its permissions or attributes (chmod / chown / chattr), "
                 "or choose another output.dir",
    errno.EFBIG: "the file outgrew the file-size limit of this process (ulimit -f) or of the filesystem: raise "
                 "the limit, or choose an output.dir on another filesystem",
    errno.EIO: "the disk reported an I/O error: check the disk (dmesg), or choose an output.dir on another one",
    errno.EISDIR: "a directory is in the way of that file: move it away",
    errno.ENOTDIR: "a file is in the way of a directory of that path: move it away",
    errno.ENOENT: "the directory disappeared while the run was writing to it: recreate it",
}
STORAGE_ERRNOS = frozenset(_STORAGE_FIXES)


def storage_problem(exc: OSError) -> tuple[str, str]:
    """(what the OS said, what to do about it) for a failed write into the output directory."""
    why = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    return why, _STORAGE_FIXES.get(exc.errno, "check that output.dir is on a writable disk with free space")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoint markers, teacher-cache manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_torch_file(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers; anything else is refused.

    A pickle can run arbitrary code when unpickled; ``weights_only`` only reconstructs tensors,
    numbers, strings and containers, so a tampered file fails here instead of executing.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftlabError(
            f"refusing to load {path}: it holds more than tensors and plain containers, or is damaged "
            f"({first}). peftlab checkpoints never contain code; delete this checkpoint or resume from one "
            "you trust (resume: PATH)"
        ) from None


# ---- writing --------------------------------------------------------------------------------------------


def adapter_files(model: torch.nn.Module, base_model_name_or_path: str,
                  tensors: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    """The PEFT-format adapter files of ``model`` as bytes (what ``peft_format.save_adapter`` writes);
    ``tensors``: the LoRA weights already gathered (ZeRO-3), instead of reading them from ``model``."""
    source = lora_state_dict(model) if tensors is None else tensors
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in source.items()}
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path)
    return {
        "adapter/adapter_model.safetensors": safetensors_bytes(tensors, metadata={"format": "pt"}),
        "adapter/adapter_config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }


def write_checkpoint(root: Path, step: int, files: dict[str, bytes], *, keep_last: int | None = None) -> Path:
    """Atomically write a checkpoint directory holding ``files`` (relative name -> bytes).

    Raises PeftlabError when the disk refuses a write (full, read-only, quota); the partial
    directory is removed and every earlier checkpoint is left as it was.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = root / name
    previous = latest_complete(root)
    try:
        manifest: dict[str, dict[str, Any]] = {}
        # An incomplete or corrupt leftover of the same step is replaced (moved aside, then dropped).
        with atomic_directory(final, overwrite=True) as tmp:
            for i, (rel, data) in enumerate(files.items(), start=1):
                path = safe_subpath(tmp, rel, what="checkpoint file")
                path.parent.mkdir(parents=True, exist_ok=True)
                write_file(path, data)
                manifest[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                kill_point(f"save-{step}-file-{i}")
            for d in {safe_subpath(tmp, rel, what="checkpoint file").parent for rel in files} | {tmp}:
                fsync_dir(d)  # the directory entries (atomic_directory fsyncs the files and the rename)
        kill_point(f"save-{step}-renamed")
        marker = {"format": FORMAT_VERSION, "step": step, "files": manifest}
        atomic_write(final / MARKER, lambda tmp: write_file(tmp, (json.dumps(marker, indent=1, sort_keys=True)
                                                                  + "\n").encode()))
    except BaseException as exc:
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)
        if not isinstance(exc, OSError):
            raise
        why, fix = storage_problem(exc)
        kept = (f"the previous checkpoint {previous} is intact" if previous is not None
                else "no earlier checkpoint exists in it")
        raise PeftlabError(
            f"could not write checkpoint {name} into {root}: {why}; {kept}. The partial checkpoint was "
            f"removed. To continue: {fix}, then rerun with resume: auto (it continues from the last complete "
            "checkpoint)"
        ) from None
    kill_point(f"save-{step}-done")
    if keep_last is not None:
        rotate(root, keep_last)
    return final


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Keep the newest ``keep_last`` complete checkpoints; remove older ones and leftovers of crashes.

    Only complete checkpoints count, so the newest complete checkpoint is never removed, whatever
    incomplete or corrupt directories lie around. Returns what was removed.
    """
    keep_last = max(1, keep_last)
    complete, broken = scan(root, deep=True)  # hashed: a same-size bit flip must not pass for complete
    removed = [p for p, _ in complete[:-keep_last]]
    newest = complete[-1][0] if complete else None
    # Leftovers of interrupted saves older than the newest complete checkpoint can never be resumed from.
    for path, _reason in broken:
        step = checkpoint_step(path)
        if newest is not None and step is not None and step < checkpoint_step(newest):
            removed.append(path)
    removed += [child for child in (root.iterdir() if root.is_dir() else []) if is_interrupted_write(child)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ---- reading ---------------------------------------------------------------------------------------------


def verify(path: Path, *, deep: bool = True) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None when every file matches its COMPLETE entry.

    ``deep=False`` checks the marker, file presence and sizes only (no hashing): enough for rotation
    and messages, while resuming always hashes."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (the save was interrupted)"
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and files
    except Exception:  # noqa: BLE001 — any damage to the marker makes the checkpoint unusable
        return f"its {MARKER} marker is unreadable"
    if manifest.get("format") != FORMAT_VERSION:
        return f"checkpoint format {manifest.get('format')!r} (this peftlab reads format {FORMAT_VERSION})"
    for rel, meta in files.items():
        f = path / rel
        if not f.resolve().is_relative_to(path.resolve()):
            return f"its {MARKER} marker names a file outside it ({rel})"
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{rel} is truncated or altered ({size} of {meta['size']} bytes)"
        if deep and file_sha256(f) != meta["sha256"]:
            return f"{rel} does not match its checksum (corrupted)"
    return None


def scan(root: Path, *, deep: bool = True) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    """(complete checkpoints as (path, step) oldest first, unusable ones as (path, reason))."""
    complete: list[tuple[Path, int]] = []
    broken: list[tuple[Path, str]] = []
    if not root.is_dir():
        return complete, broken
    for child in sorted(root.iterdir()):
        step = checkpoint_step(child)
        if step is None or not child.is_dir():
            continue
        reason = verify(child, deep=deep)
        if reason is None:
            complete.append((child, step))
        else:
            broken.append((child, reason))
    complete.sort(key=lambda c: c[1])
    return complete, broken


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every ``step-N`` directory under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def remove_checkpoints(root: Path) -> None:
    """Delete every checkpoint under ``root`` and the leftovers of interrupted saves (``output.overwrite``)."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if checkpoint_step(child) is not None or is_interrupted_write(child) or child.name.startswith(".ds-staging-"):
            shutil.rmtree(child, ignore_errors=True)


def latest_complete(root: Path, *, deep: bool = False) -> Path | None:
    complete, _ = scan(root, deep=deep)
    return complete[-1][0] if complete else None
