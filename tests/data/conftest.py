"""Fixtures of the data cache tests."""
from __future__ import annotations

import pytest

from peftlab.data import cache


@pytest.fixture
def fresh_cache_process(monkeypatch):
    """Each test is a run of its own: no cache entry in use by this process, no cache warning given yet."""
    monkeypatch.setattr(cache, "_in_use", set())
    monkeypatch.setattr(cache, "_warned", set())
