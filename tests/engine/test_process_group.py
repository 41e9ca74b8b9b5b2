"""The process group: a single process joins nothing and every collective is an identity; a rank whose peers
never arrive stops after PEFTLAB_JOIN_TIMEOUT naming them (not a bare store timeout); an unreachable rendezvous
and malformed timeouts are one clear message each."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers import REPO, free_port, subprocess_env

from peftlab.engine import process_group as pg
from peftlab.errors import PeftlabError


def test_a_single_process_joins_nothing(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = pg.join_process_group()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert pg.all_reduce_sum(7) == 7 and pg.all_reduce_sum(2.5) == 2.5
    pg.barrier()  # no-op
    assert pg.rank() == 0 and pg.world_size() == 1 and pg.is_main_process()


def test_env_seconds(monkeypatch):
    monkeypatch.delenv("PEFTLAB_JOIN_TIMEOUT", raising=False)
    assert pg.env_seconds("PEFTLAB_JOIN_TIMEOUT", 300.0) == 300.0
    monkeypatch.setenv("PEFTLAB_JOIN_TIMEOUT", "2.5")
    assert pg.env_seconds("PEFTLAB_JOIN_TIMEOUT", 300.0) == 2.5
    for bad, what in (("soon", "expected a number of seconds"), ("0", "expected a positive number of seconds")):
        monkeypatch.setenv("PEFTLAB_JOIN_TIMEOUT", bad)
        with pytest.raises(PeftlabError, match=f"PEFTLAB_JOIN_TIMEOUT='{bad}': {what}"):
            pg.env_seconds("PEFTLAB_JOIN_TIMEOUT", 300.0)


JOIN = """
from peftlab.engine.process_group import join_process_group
from peftlab.errors import PeftlabError
try:
    join_process_group()
except PeftlabError as exc:
    print(exc)
"""


def test_missing_ranks_are_named_after_the_join_timeout():
    """Rank 0 of 3 hosts the rendezvous and waits; ranks 1 and 2 never start."""
    env = {**subprocess_env(), "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PEFTLAB_JOIN_TIMEOUT": "2"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-P", "-c", JOIN], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("rank 0: rank(s) 1, 2 of 3 did not join within 2s (MASTER_ADDR=127.0.0.1, MASTER_PORT=")
    assert "start every node (peftlab launch ... --node-rank N), or raise PEFTLAB_JOIN_TIMEOUT" in p.stdout
    assert time.monotonic() - t0 < 60


def test_an_unreachable_rendezvous_is_named():
    env = {**subprocess_env(), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PEFTLAB_JOIN_TIMEOUT": "1"}
    p = subprocess.run([sys.executable, "-P", "-c", JOIN], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("rank 1: cannot reach the rendezvous at MASTER_ADDR=127.0.0.1 MASTER_PORT=")
    assert "check that node rank 0 is running" in p.stdout
