"""The process group of a launched run: ranks, joining with a timeout, barrier, sums, leaving.

Under a launcher (``peftlab launch``, ``deepspeed``, ``torchrun``, SLURM via our sbatch) every process runs
the same trainer; the launcher exports ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``. :func:`join_process_group`
joins the group (gloo on CPU, NCCL on GPUs), naming the ranks that never arrived instead of hanging. Everything
else here is an identity in a single process, so the trainer calls it unconditionally. DeepSpeed adopts this
group (:func:`peftlab.engine.deepspeed.join_for_deepspeed`); nothing here imports it. Once joined, a rank that
fails tells the others through the rendezvous store, and they stop with its message instead of waiting in a
collective for the backend's timeout (:mod:`peftlab.engine.rank_failure`).
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from peftlab.engine.rank_failure import FailureWatch, exception_failure
from peftlab.errors import PeftlabError

DEFAULT_JOIN_TIMEOUT_S = 300.0
"""How long a rank waits for the others to join (``PEFTLAB_JOIN_TIMEOUT``)."""
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
"""Timeout of every collective once joined (``PEFTLAB_COLLECTIVE_TIMEOUT``)."""

_watch: FailureWatch | None = None
"""This process's watch for another rank's failure, while it is in a launched run's process group."""

_launcher_env_set: dict[str, str] = {}
"""The launcher variables that joining a one-process DeepSpeed run set, and their values (:func:`restore_launcher_env`
takes them back)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank/world size as a launcher (deepspeed, torchrun, SLURM via our sbatch) exports them."""
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_sum(value: float) -> float:
    """Σ over ranks of a Python number (fp64, so token counts stay exact); identity in one process."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    out = float(t.item())
    return int(out) if isinstance(value, int) else out


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown_distributed(*, synchronize: bool = True) -> None:
    """Leave the process group before the interpreter exits (after a barrier when the run succeeded).
    Left to interpreter teardown, gloo's worker threads can be destroyed while still joinable: a rank
    then aborts with "terminate called without an active exception" after a finished run (seen under
    load in the ZeRO-3 test).

    After a failure (``synchronize=False``, called while its exception is handled) the other ranks are told
    first, so they stop with this rank's message (:mod:`.rank_failure`). When another rank had failed first and
    this rank's error is not one peftlab explains (typically gloo's "connection closed by peer" as that rank
    left), a PeftlabError carrying that rank's message and exit status replaces it."""
    global _watch
    watch, _watch = _watch, None
    peer = None
    if watch is not None:
        if synchronize:
            watch.stop()
        else:
            exc = sys.exc_info()[1]
            message, code = exception_failure(exc) if exc is not None else ("stopped", 1)
            peer = watch.announce(message, code)
            if exc is None or isinstance(exc, PeftlabError):
                peer = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if synchronize and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if watch is not None and not synchronize:
        watch.left()
    if peer is not None:
        err = PeftlabError(peer.stop_message(env_dist_info().rank))
        err.exit_code = peer.exit_code
        raise err


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name`` (``default`` when unset)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise PeftlabError(f"{name}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise PeftlabError(f"{name}={raw!r}: expected a positive number of seconds")
    return value


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def collective_timeout() -> timedelta:
    return timedelta(seconds=env_seconds("PEFTLAB_COLLECTIVE_TIMEOUT", DEFAULT_COLLECTIVE_TIMEOUT_S))


def join_process_group(*, single_process_group: bool = False, join_timeout_s: float | None = None) -> DistInfo:
    """Join the process group of a launched run; a no-op in a single process unless ``single_process_group``
    (DeepSpeed in one process still wants a process group: a private one of size 1).

    Every rank first checks in on a key-value store hosted by rank 0 at MASTER_ADDR:MASTER_PORT and
    waits at most ``join_timeout_s`` (``PEFTLAB_JOIN_TIMEOUT``) for the others; a missing rank is reported by
    number (a plain ``init_process_group`` would wait and then fail with a bare store timeout). The same store
    then backs the gloo/NCCL group.
    """
    info = env_dist_info()
    if is_distributed():
        return DistInfo(rank(), world_size(), info.local_rank)
    if info.world_size <= 1 and not single_process_group:
        return info
    if info.world_size <= 1:
        # DeepSpeed in one process also reads the launcher's variables.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            if key not in os.environ:
                os.environ[key] = _launcher_env_set[key] = value
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            torch.distributed.init_process_group(backend(), store=torch.distributed.HashStore(), rank=0,
                                                 world_size=1, timeout=collective_timeout())
        return info
    join_timeout_s = join_timeout_s or env_seconds("PEFTLAB_JOIN_TIMEOUT", DEFAULT_JOIN_TIMEOUT_S)
    store = _join_store(info, join_timeout_s)
    if backend() == "nccl":
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend(), store=torch.distributed.PrefixStore("pg", store),
                                         rank=info.rank, world_size=info.world_size, timeout=collective_timeout())
    global _watch
    _watch = FailureWatch(_store_client(join_timeout_s), info.rank, info.world_size).start()
    return info


def restore_launcher_env() -> None:
    """Take back the launcher variables that joining a one-process DeepSpeed run set (``RANK=0``, ``LOCAL_RANK=0``,
    ``WORLD_SIZE=1``), once the run is over. Left behind, they tell other libraries in this process that it is a
    rank of a launched job: accelerate (under TRL's and HF's trainers) reads ``LOCAL_RANK`` and sets itself up as
    a multi-process CPU run. Variables a launcher or the user had set are kept, and so is one changed since. The
    private process group stays: the run's ZeRO-3 model still gathers its parameters through it."""
    for key, value in list(_launcher_env_set.items()):
        if os.environ.get(key) == value:
            del os.environ[key]
    _launcher_env_set.clear()


def _store_client(timeout_s: float) -> Any:
    """A connection of its own to the rendezvous store, for the failure watch's thread (the process group's
    connection stays the main thread's)."""
    return torch.distributed.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                      int(os.environ.get("MASTER_PORT", "29500")), is_master=False,
                                      timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def _join_store(info: DistInfo, join_timeout_s: float) -> Any:
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        port = int(os.environ.get("MASTER_PORT", "29500"))
    except ValueError:
        raise PeftlabError(f"MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port number") from None
    try:
        store = torch.distributed.TCPStore(addr, port, info.world_size, is_master=info.rank == 0,
                                           timeout=timedelta(seconds=join_timeout_s), wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for an unreachable master
        raise PeftlabError(
            f"rank {info.rank}: cannot reach the rendezvous at MASTER_ADDR={addr} MASTER_PORT={port} within "
            f"{join_timeout_s:.0f}s ({type(exc).__name__}: {exc}); check that node rank 0 is running, that "
            "the address resolves from this node and that the port is open (PEFTLAB_JOIN_TIMEOUT raises the wait)"
        ) from None
    _wait_for_ranks(store, info, join_timeout_s)
    return store


def _wait_for_ranks(store: Any, info: DistInfo, timeout_s: float) -> None:
    store.set(f"peftlab/joined/{info.rank}", socket.gethostname())
    deadline = time.monotonic() + timeout_s
    missing = list(range(info.world_size))
    while True:
        missing = [r for r in missing if not store.check([f"peftlab/joined/{r}"])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise PeftlabError(
                f"rank {info.rank}: rank(s) {', '.join(map(str, missing))} of {info.world_size} did not join "
                f"within {timeout_s:.0f}s (MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT="
                f"{os.environ.get('MASTER_PORT')}); start every node (peftlab launch ... --node-rank N), "
                "or raise PEFTLAB_JOIN_TIMEOUT"
            )
        time.sleep(0.05)
