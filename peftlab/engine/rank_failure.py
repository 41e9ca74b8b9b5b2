"""One rank failing stops every rank of a multi-process run, each with the failing rank's message.

When one rank fails (out of memory at a step, a full disk, a guard, any exception) the others are usually
inside, or about to enter, a collective that rank will never join. NCCL notices a dead peer only at the
collective timeout (``PEFTLAB_COLLECTIVE_TIMEOUT``, 30 min by default); a launcher notices only the ranks it
started itself (with ``peftlab launch --no-ssh`` each node runs its own); gloo notices a closed connection, but the
surviving ranks then end in a traceback that does not say what went wrong.

So the failing rank writes its message to the rendezvous key-value store every rank already shares (the one
:func:`peftlab.engine.process_group.join_process_group` checks in on) before it leaves, and every rank runs a
:class:`FailureWatch`: a daemon thread that polls the store and, when another rank's failure is recorded, logs
that message with both rank numbers and exits the process with the failing rank's status (a thread can end a
process blocked inside a collective; nothing else in it can). The failing rank waits (at most
:data:`ACK_WAIT_S`) until every other rank has seen the failure, so a rank that serves the store does not take
the message down with it. Keys carry torchrun's restart count: a restarted attempt never reads the last one's.

``os._exit`` runs no ``finally`` blocks and no ``atexit`` handlers, so whatever holds a run open or output
buffered registers a closer with :func:`close_before_stop`: the experiment trackers do
(:mod:`peftlab.metrics.trackers`: the run ends as failed, its buffered records sent). TensorBoard's event file and
metrics.jsonl need none: they are written and flushed record by record (:mod:`peftlab.metrics.runlog`). The watch
runs the registered closers before it ends the process — each in a thread of its own, all together bounded by
:data:`CLOSE_WAIT_S`, so a closer that hangs (a tracker server that no longer answers) cannot keep a stopped rank
alive.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

POLL_S = 0.2
"""How often every rank looks for another rank's failure (one small store request)."""
ACK_WAIT_S = 10.0
"""How long a failing rank waits for the others to have seen its failure before it leaves."""
CLOSE_WAIT_S = 2.0
"""How long a stopped rank gives its registered closers (:func:`close_before_stop`), all together."""

_closers: dict[int, Callable[[], None]] = {}
_closers_lock = threading.Lock()
_next_closer = iter(range(1, 1 << 62))


def close_before_stop(close: Callable[[], None]) -> Callable[[], None]:
    """Have ``close`` run if the failure watch stops this process (it leaves through ``os._exit``: nothing else of
    the process runs then). Returns the function that unregisters it — call that when the thing is closed the
    normal way."""
    with _closers_lock:
        key = next(_next_closer)
        _closers[key] = close

    def unregister() -> None:
        with _closers_lock:
            _closers.pop(key, None)

    return unregister


def run_closers(timeout_s: float = CLOSE_WAIT_S) -> list[str]:
    """Run every registered closer, each in a daemon thread, waiting at most ``timeout_s`` for them all; returns
    the names of those still running then (abandoned: the process is about to end). A closer that raises is
    logged and counts as done."""
    with _closers_lock:
        closers = list(_closers.values())
        _closers.clear()

    def guarded(close: Callable[[], None]) -> None:
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - the process is ending: say so and go on with the others
            logger.warning(f"closing {_name(close)} before stopping failed: {exc}")

    threads = [threading.Thread(target=guarded, args=(c,), name=f"peftlab-close-{_name(c)}", daemon=True)
               for c in closers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [_name(c) for c, t in zip(closers, threads) if t.is_alive()]
    if hung:
        logger.warning(f"stopping without waiting longer than {timeout_s:g} s for: {', '.join(hung)}")
    return hung


def _name(close: Callable[[], None]) -> str:
    owner = getattr(close, "__self__", None)
    return type(owner).__name__ if owner is not None else getattr(close, "__qualname__", repr(close))


@dataclass(frozen=True)
class RankFailure:
    rank: int
    exit_code: int
    message: str

    def encode(self) -> str:
        return f"{self.rank}\n{self.exit_code}\n{self.message}"

    @classmethod
    def decode(cls, raw: bytes | str) -> RankFailure:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        rank, code, message = text.split("\n", 2)
        return cls(int(rank), int(code), message)

    def stop_message(self, own_rank: int) -> str:
        """What a rank that did not fail says when it stops for this failure."""
        message = self.message.removeprefix(f"rank {self.rank}: ")  # the failing rank's messages name it
        return f"rank {own_rank}: stopped because rank {self.rank} failed: {message}"


def exception_failure(exc: BaseException) -> tuple[str, int]:
    """(message, exit status) of a rank that failed with ``exc``: a PeftlabError's message and status, else the
    exception's type and first line (its traceback is in that rank's own log)."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and code > 0:
        return str(exc), code
    lines = str(exc).strip().splitlines()
    first = f": {lines[0][:300]}" if lines else ""
    return f"{type(exc).__name__}{first} (its traceback is in that rank's log)", 1


def _flush_logs() -> None:
    for name in ("peftlab", ""):
        for handler in logging.getLogger(name).handlers:
            handler.flush()
    sys.stderr.flush()


class FailureWatch:
    """Announce this rank's failure to the others, and stop this process when another rank announces one."""

    def __init__(self, store: Any, rank: int, world_size: int, *, poll_s: float = POLL_S,
                 ack_wait_s: float = ACK_WAIT_S, close_wait_s: float = CLOSE_WAIT_S,
                 exit_process: Any = os._exit) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.poll_s, self.ack_wait_s, self._exit = poll_s, ack_wait_s, exit_process
        self.close_wait_s = close_wait_s
        prefix = f"peftlab/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.key, self.stopped_key, self.done_key = f"{prefix}/first", f"{prefix}/stopped", f"{prefix}/done"
        self._lock = threading.Lock()
        self._outcome: str | None = None  # "announced" (this rank failed) or "stopping" (another rank did)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peftlab-failure-watch", daemon=True)

    def start(self) -> FailureWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the run ended normally; or this rank failed)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.poll_s + 1.0)

    def peer_failure(self) -> RankFailure | None:
        """The failure another rank recorded, if any (``check`` first: ``get`` of a missing key would wait)."""
        if not self.store.check([self.key]):
            return None
        failure = RankFailure.decode(self.store.get(self.key))
        return failure if failure.rank != self.rank else None

    def announce(self, message: str, exit_code: int) -> RankFailure | None:
        """Record this rank's failure (the first one recorded wins) and wait until the other ranks have seen it
        or failed themselves (at most ``ack_wait_s``). Returns the failure another rank recorded first, if any
        (this rank's own error is then most likely the backend noticing that rank leave). Never raises: with
        the store gone the others still learn from the launcher or the backend."""
        with self._lock:
            outcome, self._outcome = self._outcome, self._outcome or "announced"
        if outcome == "stopping":  # the watch thread is already ending this process with the failing rank's message
            time.sleep(self.ack_wait_s + 5 * self.poll_s)
            return None
        self._stop.set()  # not joined: the thread may be inside a store request; it acts only under the lock
        if outcome is not None:
            return None
        mine = RankFailure(self.rank, exit_code, message)
        try:
            first = RankFailure.decode(self.store.compare_set(self.key, "", mine.encode()))
            self.store.add(self.stopped_key, 1)
            if first.rank != self.rank:
                return first
            deadline = time.monotonic() + self.ack_wait_s
            while self.store.add(self.stopped_key, 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(self.poll_s / 2)
        except Exception as exc:  # noqa: BLE001 - torch raises several types when the store host is gone
            logger.debug(f"rank {self.rank}: could not tell the other ranks about its failure ({exc})")
        return None

    def left(self) -> None:
        """This failed rank has left the process group: the ranks stopping for it may exit now (until then they
        wait, so that a launcher reacting to their exit does not end this rank before it has said why)."""
        try:
            self.store.set(self.done_key, "1")
        except Exception:  # noqa: BLE001, S110 - they stop after ack_wait_s anyway
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                failure = self.peer_failure()
            except Exception as exc:  # noqa: BLE001 - the store host left: nothing more can be learnt from it
                logger.debug(f"rank {self.rank}: the failure watch stopped ({exc})")
                return
            if failure is None:
                continue
            with self._lock:
                if self._outcome is not None:
                    return
                self._outcome = "stopping"
            self._stop_for(failure)
            return

    def _stop_for(self, failure: RankFailure) -> None:
        # This process is likely blocked inside a collective the failed rank never joins: only leaving the
        # process ends that wait. What it wrote is complete (checkpoints are atomic, metrics line by line);
        # what registered a closer (experiment trackers) is closed first, within close_wait_s.
        logger.error(failure.stop_message(self.rank))
        _flush_logs()
        store_gone = False
        try:
            self.store.add(self.stopped_key, 1)  # first: the failing rank waits for it, not for the closers
        except Exception:  # noqa: BLE001 - the failed rank's store is gone: it has left already
            store_gone = True
        run_closers(self.close_wait_s)
        _flush_logs()
        try:
            deadline = time.monotonic() + self.ack_wait_s
            while not store_gone and not self.store.check([self.done_key]) and time.monotonic() < deadline:
                time.sleep(self.poll_s / 2)
        except Exception:  # noqa: BLE001, S110 - the failed rank's store is gone: it has left already
            pass
        self._exit(failure.exit_code)
