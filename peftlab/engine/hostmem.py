"""The host side of a CPU training process: glibc's allocator made predictable, and OpenMP threads that
degrade gracefully on a shared machine (see "CPU threads" below).

glibc's ``malloc`` serves a request below its *mmap threshold* from a heap arena and a larger one
with a private mapping that goes back to the OS at ``free``. The threshold is dynamic: each time a
mapped block is freed it rises to that block's size (up to 32 MiB on 64-bit). After the first
training step, therefore, nearly every activation and temporary of a CPU run is carved out of the
heap, and the heap keeps what is freed, fragmented by the tensors that stay alive between layers. The
process then holds far more than its live tensors, and how much more depends on the order of
allocations. Measured on this project's machine for the same run (bench/bench_estimate.py,
"small" case, seq 512 x 2): peak RSS 2.44 GB with the default allocator, 1.75 GB with a fixed 1 MiB
threshold.

:func:`bound_host_heap` fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the
dynamic adjustment off), so every tensor of 1 MiB or more is its own mapping and is returned when
freed: peak RSS follows the live tensors, which is what ``peftlab estimate`` predicts without an
empirical allocator term. The cost is a page fault per fresh page of each large allocation: measured
+40% step time on that 100M model (2 threads), so it is opt-in — the trainer applies it on the CPU
when ``train.host_allocator: bounded`` (the 8B scale run in bench/scale.py uses it); on other C
libraries it is a no-op.

``train.host_allocator: auto`` (the default) keeps glibc's fast heap but bounds what it retains, at almost
no cost: torch is asked to back every tensor of 2 MiB or more with transparent huge pages
(:func:`request_huge_pages`: ``THP_MEM_ALLOC_ENABLE=1``, read by torch's CPU allocator at its first such
allocation; the kernel's ``transparent_hugepage`` setting must be ``madvise`` or ``always``), which cuts
page faults ~100x, and the local engine hands the heap's free pages back after every micro-batch's backward
(:func:`release_if_worthwhile`: when it holds 64 MiB or more), so what one micro-batch fragmented is not
carried into the next. Measured on the vs_peers comparison model (155M, 128k vocabulary, 2 x 512 tokens, 2
threads; bench/RESULTS.md): peak RSS 1.48 GB default, 1.24 GB auto, 1.01 GB bounded at 175 / 173 / 148
tokens/s (bounded's cost: +3.5 s of page faults per step).
"""
from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import MutableMapping
from typing import Any

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 20

_LIBC: Any = None
_BOUNDED: int | None = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_freed_memory() -> None:
    """Hand memory freed by torch back to the OS (glibc ``malloc_trim``; a no-op elsewhere). The
    streaming loader calls it after each tensor: measured on a 300 MB bf16 checkpoint, loading grew
    the resident set by 330 MB without it, against the 78 MB the 4-bit model needs."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def request_huge_pages(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Ask torch's CPU allocator for transparent huge pages on tensors >= 2 MiB (``THP_MEM_ALLOC_ENABLE=1``)
    unless the user set the variable. torch reads it once, at its first allocation of that size, so this must
    run before the model is loaded (the trainer calls it first thing when it loads one); later it changes
    nothing. Returns whether huge pages are requested now."""
    environ.setdefault(HUGE_PAGES_ENV, "1")
    return environ[HUGE_PAGES_ENV] == "1"


class _Mallinfo2(ctypes.Structure):  # glibc >= 2.33 <malloc.h>
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_free_bytes() -> int | None:
    """Bytes the C heap holds free (glibc ``mallinfo2().fordblks``, every arena); None where unknown."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc else None
    if fn is None:
        return None
    fn.restype = _Mallinfo2
    return int(fn().fordblks)


TRIM_MIN_FREE = 64 << 20  # below this a trim is not worth the page faults of re-using the pages it gives back


def release_if_worthwhile(min_free: int = TRIM_MIN_FREE) -> bool:
    """:func:`release_freed_memory` when the heap holds at least ``min_free`` free bytes (or when that cannot be
    known). A trim gives pages back that the next micro-batch faults in again: on a small model (a few MiB free
    after each backward) that cost ~20 % of the step for nothing (measured: the test suite's tiny Llama, 30
    steps, 4.9-5.2 s vs 6.2-6.5 s); on the vs_peers model (~300 MB free after a backward) it is what keeps the
    peak down. Returns whether it trimmed."""
    free = heap_free_bytes()
    if free is not None and free < min_free:
        return False
    release_freed_memory()
    return True


def bound_host_heap(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (see the module doc).
    Returns whether it took effect. Idempotent; process-wide by nature (it is the C allocator)."""
    global _BOUNDED
    if _BOUNDED == threshold:
        return True
    libc = _libc()
    if not libc:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold))) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * int(threshold)))
    if ok:
        _BOUNDED = threshold
        libc.malloc_trim(0)
    return ok


def prepare_host_allocator(setting: str) -> None:
    """What ``train.host_allocator`` sets up in a CPU process before its model loads: ``bounded`` fixes glibc's
    mmap threshold (:func:`bound_host_heap`), ``auto`` requests huge pages (:func:`request_huge_pages`; the engine
    trims the heap after each backward), ``default`` changes nothing. The memory planner's baseline probe calls
    it the same way, so the baseline it measures is that of the allocator the run trains with."""
    if setting == "bounded":
        bound_host_heap()
    elif setting == "auto":
        request_huge_pages()


# ---- CPU threads ----------------------------------------------------------------------------------
#
# torch's CPU kernels run on an OpenMP pool (torch 2.13's wheel bundles GNU libgomp). By default a libgomp
# thread that waits at a barrier SPINS (GOMP_SPINCOUNT = 300,000 iterations) before it sleeps. When other
# processes keep the cores busy, the spinning waiters take CPU time from the sibling that still has work,
# which the OS then deschedules for whole time slices. Measured on this project's 2-core machine
# (quickstart model, 2 threads, seconds per step; figures and conditions in bench/RESULTS.md): with one
# `yes` per core on an already loaded machine 11-13 s (max 24 s) by default, 1.0-1.1 s with
# OMP_WAIT_POLICY=PASSIVE (waiters sleep at once), 1.5-2.5 s with 1 thread; with two `yes` per core,
# interleaved, 1.2-3.7 s (max 7.4 s) by default against 0.56-1.07 s passive; lightly loaded, passive costs
# 0.05-0.1 s of ~0.2 s. Passive is therefore the default; a user's OMP_WAIT_POLICY / GOMP_SPINCOUNT wins
# (GOMP_SPINCOUNT=1000, a short spin, measured as good under load and slightly faster lightly loaded).
# libgomp reads these variables ONCE, when it is loaded — i.e. when torch is imported; set later they
# change nothing (measured: 9.0 s, as the default). So the CLI calls configure_openmp_wait_policy() before
# anything imports torch, and the trainer reports what is in effect.

WAIT_POLICY_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_WAIT_POLICY_SET: str | None = None  # what configure_openmp_wait_policy() set, when it set something


def openmp_runtime_loaded() -> bool:
    """Whether an OpenMP runtime (libgomp, Intel's libiomp, LLVM's libomp) is already mapped into this
    process — from then on its environment variables have been read."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:  # no /proc: torch loads the runtime, so its import is the moment
        return "torch" in sys.modules
    return any(lib in maps for lib in ("libgomp", "libiomp", "libomp"))


def configure_openmp_wait_policy(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Make waiting OpenMP threads sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``) — unless the user
    chose a policy (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set) or the runtime is already loaded (too
    late: it read its environment then). Call it before torch is imported; returns what it set, or None.
    Child processes (DeepSpeed ranks, the memory planner's probe) inherit the choice."""
    global _WAIT_POLICY_SET
    if any(k in environ for k in WAIT_POLICY_ENV) or openmp_runtime_loaded():
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _WAIT_POLICY_SET = "PASSIVE"
    return _WAIT_POLICY_SET


def openmp_wait_policy() -> str:
    """What OpenMP's wait policy is in this process, in words (for the trainer's start-up line)."""
    env = {k: os.environ[k] for k in WAIT_POLICY_ENV if k in os.environ}
    if _WAIT_POLICY_SET is not None and env.get("OMP_WAIT_POLICY") == _WAIT_POLICY_SET:
        return "passive (waiting threads sleep; peftlab's default, OMP_WAIT_POLICY overrides it)"
    if env:
        return ", ".join(f"{k}={v}" for k, v in env.items()) + " (from the environment)"
    return ("libgomp's default: waiting threads spin first (slow when other processes keep the cores busy; "
            "set OMP_WAIT_POLICY=passive before starting)")


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask (taskset, SLURM), capped by a cgroup v2 CPU quota
    (a container's ``--cpus``) — torch's default pool has one thread per core it can SEE, which in a
    container with a quota oversubscribes what it may use."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = _cgroup_cpu_max().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cgroup_cpu_max() -> str:
    """cgroup v2's ``cpu.max`` of this process's cgroup ("QUOTA PERIOD" or "max PERIOD"); OSError where
    absent (cgroup v1, the root cgroup, no /sys)."""
    with open("/proc/self/cgroup") as f:
        path = next((line.strip()[3:] for line in f if line.startswith("0::")), "/")
    with open(os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cpu.max")) as f:
        return f.read()


def choose_cpu_threads(requested: int | None, current: int) -> tuple[int, str]:
    """(threads for torch's intra-op pool, why): ``train.threads`` when set; else torch's current pool
    (its default, or ``OMP_NUM_THREADS``) capped at :func:`cpu_budget`."""
    if requested:
        return requested, "train.threads"
    budget = cpu_budget()
    if current > budget:
        return budget, f"the {budget} CPU(s) this process may use (affinity / cgroup quota)"
    source = "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else "torch's default"
    return current, f"{source}; train.threads sets it"
