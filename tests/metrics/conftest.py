"""Fixtures of the console tests."""
from __future__ import annotations

import logging

import pytest

from peftlab.metrics import console


@pytest.fixture(autouse=True)
def fresh_logger(monkeypatch):
    """The peftlab logger as a fresh process has it (no handlers, propagating), restored afterwards: the CLI
    tests configure the real one, and pytest attaches its capture handlers to loggers that do not propagate."""
    logger = logging.getLogger(console.LOGGER)
    own = [h for h in logger.handlers if not type(h).__module__.startswith("_pytest")]
    saved = (own, logger.level, logger.propagate)
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    for name in ("RANK", console.ALL_RANKS_ENV, console.LEVEL_ENV):
        monkeypatch.delenv(name, raising=False)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved
