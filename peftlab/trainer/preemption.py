"""Preemption: SIGTERM (a scheduler's notice, ``scancel``, spot-instance reclaim) and SIGINT (Ctrl-C).

The first signal asks the loop to write a checkpoint at the next step boundary and stop (the process then
exits 0, and ``resume: auto`` continues exactly there); a second one exits at once, without a new checkpoint
— the last complete checkpoint stays valid, saves being atomic.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Whether a stop was asked for; :meth:`handled` installs the handlers for the duration of the loop."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handler(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            logger.warning(f"second {name}: exiting now, without a new checkpoint")
            os._exit(128 + signum)
        self.signal = signum
        logger.warning(f"{name} received: saving a checkpoint at the end of this step, then exiting "
                       "(send it again to exit at once)")

    @contextlib.contextmanager
    def handled(self) -> Iterator[Preemption]:
        """SIGTERM/SIGINT handled while the block runs (the previous handlers come back after it). Signal
        handlers can only be installed from the main thread; elsewhere the block runs without them."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
