"""Fault injection for the fault-tolerance tests: kill a real training run at an exact point, trace its steps.

Inert unless the environment asks for it, so production runs pass through these calls at the cost of an
environment lookup:

- ``PEFTLAB_TEST_KILL_AT=point[,point...]``: SIGKILL the process when it reaches a named point (see
  :func:`kill_point`) — mid-step, mid-checkpoint, between a checkpoint's rename and its ``COMPLETE`` marker;
- ``PEFTLAB_TEST_TRACE=FILE``: one JSON line per optimizer step (sample ids, the exact loss as ``float.hex``),
  which a test compares between an interrupted-and-resumed run and an uninterrupted one;
- ``PEFTLAB_TEST_STEP_DELAY=SECONDS``: sleep after every step, so a test can signal a run mid-training;
- ``PEFTLAB_TEST_OOM_AT=RANK:STEP``: raise ``torch.OutOfMemoryError`` on rank RANK (the launcher's ``RANK``, 0
  in one process) once the gradients of step STEP are accumulated (at ``step-STEP-backward``), so the other
  ranks go on into collectives that rank never joins: one rank running out of memory in a multi-process run.

tests/checkpoint/test_resume.py and tests/engine/test_deepspeed_checkpoints.py drive them.
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import torch

KILL_AT_ENV = "PEFTLAB_TEST_KILL_AT"
TRACE_ENV = "PEFTLAB_TEST_TRACE"
STEP_DELAY_ENV = "PEFTLAB_TEST_STEP_DELAY"
OOM_AT_ENV = "PEFTLAB_TEST_OOM_AT"


def kill_point(point: str) -> None:
    """SIGKILL this process at ``point`` when ``PEFTLAB_TEST_KILL_AT`` lists it (comma-separated).

    Points: ``step-N-backward`` (gradients of step N accumulated, optimizer not stepped), ``step-N``
    (step N applied, not yet logged), ``save-N-file-K`` (K files of the checkpoint of step N written),
    ``save-N-renamed`` (directory in place, marker not written), ``save-N-done``.
    """
    spec = os.environ.get(KILL_AT_ENV)
    if spec and point in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
    oom = os.environ.get(OOM_AT_ENV)
    if oom:
        rank, _, step = oom.partition(":")
        if point == f"step-{step}-backward" and rank == os.environ.get("RANK", "0"):
            # The wording of a real CUDA allocation failure, so the run explains it as one.
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by "
                                         f"{OOM_AT_ENV}={oom})")


def trace_step(record: dict[str, Any]) -> None:
    """Append a JSON line to ``PEFTLAB_TEST_TRACE`` (per-step sample ids and exact losses), and sleep
    ``PEFTLAB_TEST_STEP_DELAY`` seconds (so a test can signal a run mid-training)."""
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as f:  # appended and fsynced: the line survives the SIGKILL that may follow
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    delay = os.environ.get(STEP_DELAY_ENV)
    if delay:
        time.sleep(float(delay))
