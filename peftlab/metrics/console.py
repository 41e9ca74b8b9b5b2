"""What a run says on the console: every message goes through ``logging`` under the ``peftlab`` logger.

One switch sets how much is said (``setup_logging(level)``: the CLI's ``--quiet`` is ``warning``;
``PEFTLAB_LOG_LEVEL`` overrides), and in a multi-process run only rank 0 speaks (:class:`RankZeroFilter`;
``PEFTLAB_LOG_ALL_RANKS=1`` lets every rank speak, each line prefixed with its rank). Launchers, SLURM and
notebooks capture it like any logging output: progress and results (INFO) go to stdout, warnings and errors
to stderr — except for a command whose stdout is its product (``peftlab eval``'s JSON, ``generate``'s text):
there every message goes to stderr (``setup_logging(messages_to_stderr=True)``). Modules log through
``logging.getLogger(__name__)`` (a child of ``peftlab``); nothing in the library prints. Progress bars stay
tqdm (:func:`progress`), shown when INFO is.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

LOGGER = "peftlab"
LEVEL_ENV = "PEFTLAB_LOG_LEVEL"
ALL_RANKS_ENV = "PEFTLAB_LOG_ALL_RANKS"
_HANDLER_ATTR = "_peftlab_console"


def process_rank() -> int:
    """This process's rank as a launcher exports it (0 outside a launched run)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class RankZeroFilter(logging.Filter):
    """Only rank 0 speaks (unless ``PEFTLAB_LOG_ALL_RANKS=1``, then every record says its rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank()
        if os.environ.get(ALL_RANKS_ENV) == "1":
            record.rank_prefix = f"[rank {rank}] "
            return True
        record.rank_prefix = ""
        return rank == 0


class _Formatter(logging.Formatter):
    """INFO lines as they are (progress, results); warnings and errors as ``peftlab: warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        prefix = getattr(record, "rank_prefix", "")
        if record.levelno >= logging.WARNING:
            text = f"peftlab: {record.levelname.lower()}: {text}"
        return prefix + text


class _SplitHandler(logging.Handler):
    """INFO and below to ``out``, WARNING and above to ``err`` (everything to ``err`` with
    ``messages_to_stderr``); looked up at emit time so that a test's captured streams (pytest's capsys) and a
    notebook's redirected ones are honoured."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None):
        super().__init__()
        self._out, self._err = out, err
        self.messages_to_stderr = False

    def stream_for(self, levelno: int) -> TextIO:
        if levelno >= logging.WARNING or self.messages_to_stderr:
            return self._err or sys.stderr
        return self._out or sys.stdout

    def emit(self, record: logging.LogRecord) -> None:
        stream = self.stream_for(record.levelno)
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never take a run down
            self.handleError(record)


def _level(value: str | int | None) -> int:
    if isinstance(value, int):
        return value
    name = (value or "info").upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        from peftlab.errors import PeftlabError

        raise PeftlabError(f"log level {value!r}: use debug, info, warning or error ({LEVEL_ENV})")
    return level


BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"


class _HubKernelNotice(logging.Filter):
    """bitsandbytes (0.49+) warns when it is imported on a CPU with AVX512-BF16 that it could not fetch a 4-bit CPU
    matmul from the hub (``Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels``).
    peftlab never fetches code from a model hub at run time, and bitsandbytes' own fallback computes the same result,
    so that line only sends users the wrong way: it is shown at DEBUG (``PEFTLAB_LOG_LEVEL=debug``), not as a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"):
            return logging.getLogger(LOGGER).isEnabledFor(logging.DEBUG)
        return True


def _console_handler() -> _SplitHandler | None:
    return next((h for h in logging.getLogger(LOGGER).handlers if getattr(h, _HANDLER_ATTR, False)), None)


def setup_logging(level: str | int | None = None, *, out: TextIO | None = None, err: TextIO | None = None,
                  messages_to_stderr: bool = False) -> None:
    """Configure the ``peftlab`` logger once per process (later calls change the level and where INFO goes).

    ``level``: ``debug | info | warning | error`` (default ``info``); the environment variable
    ``PEFTLAB_LOG_LEVEL`` wins over it. ``messages_to_stderr``: INFO lines (and progress bars) go to stderr
    too, for a command whose stdout is its product and may be piped (``peftlab eval > metrics.json``).
    """
    logger = logging.getLogger(LOGGER)
    logger.setLevel(_level(os.environ.get(LEVEL_ENV) or level))
    handler = _console_handler()
    if handler is None:
        handler = _SplitHandler(out, err)
        setattr(handler, _HANDLER_ATTR, True)
        handler.setFormatter(_Formatter())
        handler.addFilter(RankZeroFilter())
        logger.addHandler(handler)
        logger.propagate = False
        logging.getLogger(BNB_CPU_OPS_LOGGER).addFilter(_HubKernelNotice())
    handler.messages_to_stderr = messages_to_stderr


def ensure_logging() -> None:
    """``setup_logging`` for library entry points: a handler is added only when none is configured yet, so the
    CLI's (or an application's own) configuration is kept. Quiet for one call: :func:`quiet_logging`."""
    if not logging.getLogger(LOGGER).handlers:
        setup_logging("info")


@contextlib.contextmanager
def quiet_logging(quiet: bool = True) -> Iterator[None]:
    """:func:`ensure_logging`, then warnings only for the duration of one call when ``quiet``
    (``train(recipe, quiet=True)``; transformers' progress bars, e.g. "Loading weights", off for that call too), and the ``peftlab`` logger's level as it was afterwards, so an application's
    later calls (and its own INFO) are not silenced by an earlier quiet one. Quiet never lowers a level
    (``error`` stays)."""
    from transformers.utils import logging as hf_logging

    ensure_logging()
    logger = logging.getLogger(LOGGER)
    level, bars = logger.level, quiet and hf_logging.is_progress_bar_enabled()
    if quiet:
        logger.setLevel(max(level, logging.WARNING))
    if bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def info_enabled() -> bool:
    """Whether INFO messages (and so progress bars) reach the console in this process."""
    logger = logging.getLogger(LOGGER)
    return logger.isEnabledFor(logging.INFO) and (process_rank() == 0 or os.environ.get(ALL_RANKS_ENV) == "1")


def progress(total: int, *, desc: str, unit: str = "step", **kwargs: Any):
    """A tqdm progress bar where INFO messages go (stdout unless ``messages_to_stderr``), shown when they are
    (rank 0, not quiet)."""
    from tqdm.auto import tqdm

    handler = _console_handler()
    stream = handler.stream_for(logging.INFO) if handler is not None else sys.stdout
    return tqdm(total=total, desc=desc, unit=unit, disable=not info_enabled(), file=stream,
                dynamic_ncols=True, **kwargs)
