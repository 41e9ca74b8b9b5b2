"""What a run says when the machine fails it: out of memory, or a disk that refuses a write of its output.

Both end in one :class:`~peftlab.errors.PeftlabError` instead of a traceback: what ran out or which file could not
be written and why, the recipe keys or steps that fix it (for memory, with what ``peftlab estimate`` predicts for
the recipe), and where the run can continue from. Complete checkpoints are never touched.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.checkpoint.atomic import target_of_temporary
from peftlab.checkpoint.store import STORAGE_ERRNOS, checkpoint_step, storage_problem
from peftlab.engine.memory_fit import out_of_memory_advice
from peftlab.engine.process_group import is_distributed, rank
from peftlab.errors import PeftlabError

_ALLOCATION_FAILURES = ("can't allocate memory", "cannot allocate memory", "out of memory",
                        "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory_detail(exc: BaseException) -> str | None:
    """The first line of ``exc`` when it is an allocation failure (CUDA OOM, MemoryError, torch's CPU
    allocator), else None."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
            isinstance(exc, RuntimeError) and any(s in str(exc) for s in _ALLOCATION_FAILURES)):
        lines = str(exc).strip().splitlines()
        return (lines[0] if lines else type(exc).__name__)[:300]
    return None


def out_of_memory_message(recipe: Any, detail: str, when: str) -> str:
    """What ran out, what ``peftlab estimate`` predicts for this recipe, and the recipe keys that lower it."""
    return f"out of memory {when} ({detail}). {out_of_memory_advice(recipe)}"


def output_write_error(exc: BaseException, out_dir: Path) -> tuple[str, int, str, str] | None:
    """(file, errno, reason, fix) when ``exc`` is the disk refusing a write of the run's output (in ``out_dir``)."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRNOS:
        return None
    if not isinstance(exc.filename, (str, bytes, os.PathLike)):
        return None
    path = Path(os.fsdecode(exc.filename))  # some writers (TensorBoard's) name the file as bytes
    if not path.resolve().is_relative_to(out_dir.resolve()):
        return None
    why, fix = storage_problem(exc)
    return str(target_of_temporary(path) or path), exc.errno, why, fix  # the file being replaced, not a temporary


def loading_failure_message(recipe: Any, memory: str) -> PeftlabError:
    """Running out of memory while loading the model and the data (``memory``: what the allocator said)."""
    return PeftlabError(out_of_memory_message(recipe, memory, "while loading the model and data")
                        + " Nothing was trained or written yet.")


def setup_failure_message(failure: Failure, recipe: Any) -> PeftlabError:
    """The message of a run that failed while it was being built, before its first step: out of memory loading the
    model and data, or the disk refusing a write of its output after the start checks passed (a resumed run
    rewrites metrics.jsonl to its checkpoint's step). Checkpoints are untouched."""
    who = f"rank {rank()}: " if is_distributed() else ""  # as failure_message: which rank of a launched run
    if failure.memory is not None:
        return PeftlabError(who + str(loading_failure_message(recipe, failure.memory)))
    path, errno_value, why, fix = failure.storage
    return PeftlabError(f"{who}could not write {path} before training started: {why} (errno "
                        f"{errno.errorcode.get(errno_value, errno_value)}); {fix}. Nothing was trained; rerun the same "
                        "command once that is fixed")


def resume_hint(last: Path | None) -> str:
    """Where the run can continue from after it stopped (``last``: its newest complete checkpoint)."""
    if last is None:
        return ("No checkpoint was written yet (train.save_every sets how often), so the run must start over: "
                "rerun the same command once that is fixed")
    return (f"The last complete checkpoint {last} (step {checkpoint_step(last)}) is intact; once that is "
            "fixed, continue with: peftlab train RECIPE --set resume=auto")


@dataclass(frozen=True)
class Failure:
    """A failure the run explains itself: running out of memory (``memory``: what the allocator said) or the disk
    refusing a write of the run's output (``storage``: file, errno, reason, fix)."""

    memory: str | None = None
    storage: tuple[str, int, str, str] | None = None


def diagnose(exc: BaseException, out_dir: Path) -> Failure | None:
    """The :class:`Failure` ``exc`` is, or None for anything else (the caller re-raises it). Only strings are kept,
    so the failed step's frames and tensors can be released before :func:`failure_message` runs the planner."""
    memory = out_of_memory_detail(exc)
    if memory is not None:
        return Failure(memory=memory)
    storage = output_write_error(exc, out_dir)
    return Failure(storage=storage) if storage is not None else None


def failure_message(failure: Failure, *, recipe: Any, step: int, last: Path | None) -> PeftlabError:
    """The message of a run that stopped with ``failure`` after ``step`` completed steps (``last``: its newest
    complete checkpoint). In a multi-process run it names the rank: the other ranks stop with it too
    (:mod:`peftlab.engine.rank_failure`)."""
    who = f"rank {rank()}: " if is_distributed() else ""
    if failure.memory is not None:
        return PeftlabError(who + out_of_memory_message(recipe, failure.memory, f"after {step} completed steps")
                            + " " + resume_hint(last))
    path, errno_value, why, fix = failure.storage
    return PeftlabError(f"{who}training stopped after step {step}: could not write {path}: {why} (errno "
                        f"{errno.errorcode.get(errno_value, errno_value)}); {fix}. {resume_hint(last)}")
