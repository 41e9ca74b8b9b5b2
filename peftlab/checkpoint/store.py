"""Resumable training checkpoints: atomic on disk, verified on load, safe to read.

One checkpoint is a directory ``<output.dir>/<checkpoint.dir>/step-0000040/``::

    adapter/adapter_model.safetensors   LoRA weights, PEFT format (the only weights file; safetensors)
    adapter/adapter_config.json         PEFT LoraConfig
    engine.pt          optimizer + scheduler (+ gradient scaler) state; torch.save, read weights_only
    rng.pt             python / numpy / torch CPU / torch CUDA generator states; read weights_only
    trainer_state.json step, epoch, sampler position, counters, guard history, data fingerprint
    recipe.yaml        the resolved recipe of the run
    COMPLETE           written last: {file: size, sha256} of every file above

Write protocol (a crash or a full disk at any moment leaves every earlier checkpoint intact and never
a directory that looks complete but is not):

1. every file is written into ``.tmp-step-0000040-<pid>/`` and fsynced, then the directory is fsynced;
2. the directory is renamed to ``step-0000040`` (a stale directory of that name is moved aside first);
3. ``COMPLETE`` is written (temp file, fsync, rename) — a directory without it is not a checkpoint;
4. rotation keeps the newest ``keep_last`` complete checkpoints and removes leftovers of crashed saves.

On resume every file is checked against the sizes and SHA-256 digests in ``COMPLETE``, so a truncated
or bit-rotten checkpoint is skipped (``resume: auto``) or refused (``resume: PATH``). Pickle-based files
are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.

The ``PEFTLAB_TEST_KILL_AT`` / ``PEFTLAB_TEST_TRACE`` / ``PEFTLAB_TEST_STEP_DELAY`` hooks at the end let
the fault-tolerance tests kill a real training process at exact points (mid-checkpoint included).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from peftlab.errors import PeftlabError

MARKER = "COMPLETE"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^step-(\d{7,})$")

# Keys whose change makes a resumed run differ from the run that wrote the checkpoint: refused.
# (A section name refuses every key inside it.)
RESUME_LOCKED_KEYS = (
    "model.name", "model.revision", "model.dtype", "model.tokenizer",
    "quantization", "adapter", "data", "distill",
    "train.micro_batch_size", "train.grad_accum", "train.seed", "train.optimizer",
)
# Keys that may change between runs without comment (where files go, how often to log/save/evaluate).
_RESUME_SILENT_PREFIXES = ("resume", "output.", "checkpoint.", "eval.", "train.log_every", "train.eval_every",
                           "train.save_every", "train.eval_at_start")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_step(path: Path) -> int | None:
    m = _NAME_RE.match(path.name)
    return int(m.group(1)) if m else None


def safe_subpath(root: Path, sub: str | os.PathLike[str], *, what: str) -> Path:
    """``root / sub``, refused when it would land outside ``root`` (``..``, absolute paths, symlinks)."""
    target = (root / sub).resolve()
    if not target.is_relative_to(root.resolve()):
        raise PeftlabError(f"{what}={str(sub)!r} points outside {root}; peftlab only writes inside the "
                           "output directory — use a relative folder name such as 'checkpoints'")
    return target


# ---- low-level writes (every byte of a checkpoint goes through _write_bytes) -------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it: after this returns the bytes are on disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def probe_writable(directory: Path) -> None:
    """Write, fsync and remove a small file in ``directory``: raises the OSError a real write would get
    (read-only filesystem, permissions, full disk) before a run has done any work."""
    probe = directory / f".peftlab-write-test-{os.getpid()}"
    try:
        _write_bytes(probe, b"peftlab\n")
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# ---- RNG states ---------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every generator a training step draws from (dropout, sampling), as tensors and plain values."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has CUDA RNG states of {len(state['cuda'])} devices, this machine has "
                          f"{torch.cuda.device_count()}; dropout masks will differ from the original run",
                          stacklevel=2)
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---- writing --------------------------------------------------------------------------------------------


def adapter_files(model: torch.nn.Module, base_model_name_or_path: str,
                  tensors: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    """The PEFT-format adapter files of ``model`` as bytes (what ``lora.save_adapter`` writes);
    ``tensors``: the LoRA weights already gathered (ZeRO-3), instead of reading them from ``model``."""
    from safetensors.torch import save as st_save

    from peftlab.adapters.peft_format import adapter_config, lora_state_dict

    source = lora_state_dict(model) if tensors is None else tensors
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in source.items()}
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path)
    return {
        "adapter/adapter_model.safetensors": st_save(tensors, metadata={"format": "pt"}),
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
    tmp = root / f".tmp-{name}-{os.getpid()}"
    previous = latest_complete(root)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        manifest: dict[str, dict[str, Any]] = {}
        for i, (rel, data) in enumerate(files.items(), start=1):
            path = safe_subpath(tmp, rel, what="checkpoint file")
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_bytes(path, data)
            manifest[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            test_kill_point(f"save-{step}-file-{i}")
        for d in {safe_subpath(tmp, rel, what="checkpoint file").parent for rel in files} | {tmp}:
            _fsync_dir(d)
        if final.exists():  # an incomplete or corrupt leftover of the same step: move it aside, then drop it
            trash = root / f".trash-{name}-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        test_kill_point(f"save-{step}-renamed")
        marker = {"format": FORMAT_VERSION, "step": step, "files": manifest}
        marker_tmp = final / f".{MARKER}.tmp"
        _write_bytes(marker_tmp, (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode())
        os.replace(marker_tmp, final / MARKER)
        _fsync_dir(final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
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
    test_kill_point(f"save-{step}-done")
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
    for child in root.iterdir() if root.is_dir() else []:
        if child.name.startswith((".tmp-", ".trash-")) and not child.name.endswith(f"-{os.getpid()}"):
            removed.append(child)
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
        if checkpoint_step(child) is not None or child.name.startswith((".tmp-", ".trash-", ".ds-staging-")):
            shutil.rmtree(child, ignore_errors=True)


def latest_complete(root: Path, *, deep: bool = False) -> Path | None:
    complete, _ = scan(root, deep=deep)
    return complete[-1][0] if complete else None


def find_resume_checkpoint(root: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint under ``root`` (``resume: auto``); skipped ones are named via ``warn``.

    None when there is nothing to resume from: no checkpoint, or only saves interrupted before their
    ``COMPLETE`` marker (a crash during the first save; starting at step 0 loses nothing). When every
    checkpoint that WAS completed is now damaged, PeftlabError naming each one and why: starting over
    would silently throw that training away, so the user chooses.
    """
    complete, broken = scan(root)
    if not complete and any((path / MARKER).is_file() for path, _ in broken):
        listing = "\n  ".join(f"{path}: {reason}" for path, reason in broken)
        raise PeftlabError(
            f"resume: auto found no usable checkpoint in {root}; every checkpoint there is damaged or "
            f"incomplete:\n  {listing}\nNothing was changed or deleted. Either resume from a checkpoint you "
            "trust (resume: PATH, e.g. a copy restored from a backup), or start over with resume: null and "
            "output.overwrite: true (that deletes these checkpoints and the run's metrics.jsonl)"
        )
    newest = complete[-1][1] if complete else -1
    for path, reason in broken:
        step = checkpoint_step(path) or 0
        if step > newest:
            warn(f"skipping checkpoint {path}: {reason}")
    return complete[-1][0] if complete else None


@dataclass
class LoadedCheckpoint:
    path: Path
    trainer_state: dict[str, Any]
    engine_state: dict[str, Any]
    rng: dict[str, Any]
    adapter_weights: dict[str, torch.Tensor]
    recipe: dict[str, Any]


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Verify and read a checkpoint directory (PeftlabError when it is incomplete, corrupt or unsafe)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise PeftlabError(f"resume: checkpoint {path} does not exist; pass a step-NNNNNNN directory under "
                           "<output.dir>/checkpoints, or resume: auto")
    reason = verify(path)
    if reason is not None:
        raise PeftlabError(f"resume: {path} is not a usable checkpoint: {reason}. Resume from an earlier "
                           "checkpoint (resume: PATH) or use resume: auto, which picks the newest complete one")
    weights_file = path / "adapter" / "adapter_model.safetensors"
    try:
        weights = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types
        raise PeftlabError(f"resume: cannot read {weights_file}: {exc}") from None
    try:
        recipe = yaml.safe_load((path / "recipe.yaml").read_text())
        state = json.loads((path / "trainer_state.json").read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftlabError(f"resume: {path} holds an unreadable recipe.yaml / trainer_state.json ({exc})") from None
    return LoadedCheckpoint(path, state, load_torch_file(path / "engine.pt"), load_torch_file(path / "rng.pt"),
                            weights, recipe)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: d}
    return {prefix[:-1]: d}


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, other) differing keys between a checkpoint's recipe and the current one, as
    ``key: saved -> current`` lines. Refused keys change what resuming would compute."""
    a, b = _flatten(saved), _flatten(current)
    refused, other = [], []
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key, "(unset)"), b.get(key, "(unset)")
        if va == vb:
            continue
        line = f"{key}: {va!r} -> {vb!r}"
        if any(key == k or key.startswith(k + ".") for k in RESUME_LOCKED_KEYS):
            refused.append(line)
        elif not any(key == p or key.startswith(p) for p in _RESUME_SILENT_PREFIXES):
            other.append(line)
    return refused, other


# ---- test hooks (environment variables; inert unless set) ----------------------------------------------


def test_kill_point(point: str) -> None:
    """SIGKILL this process at ``point`` when ``PEFTLAB_TEST_KILL_AT`` lists it (comma-separated).

    Points: ``step-N-backward`` (gradients of step N accumulated, optimizer not stepped), ``step-N``
    (step N applied, not yet logged), ``save-N-file-K`` (K files of the checkpoint of step N written),
    ``save-N-renamed`` (directory in place, marker not written), ``save-N-done``.
    """
    spec = os.environ.get("PEFTLAB_TEST_KILL_AT")
    if spec and point in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def test_trace(record: dict[str, Any]) -> None:
    """Append a JSON line to ``PEFTLAB_TEST_TRACE`` (per-step sample ids and exact losses), and sleep
    ``PEFTLAB_TEST_STEP_DELAY`` seconds (so a test can signal a run mid-training)."""
    path = os.environ.get("PEFTLAB_TEST_TRACE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    delay = os.environ.get("PEFTLAB_TEST_STEP_DELAY")
    if delay:
        time.sleep(float(delay))
