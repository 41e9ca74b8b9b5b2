"""CPU threads (peftlab/hostmem.py, "CPU threads"): OpenMP's wait policy is chosen before torch loads its
OpenMP runtime (libgomp reads it once, at load — checked with libgomp's own OMP_DISPLAY_ENV report), a
user's choice and a too-late call are left alone, and the pool never exceeds the CPUs the process may use."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peftlab.engine import hostmem

SCRIPT = r"""
import sys
from peftlab.engine.hostmem import configure_openmp_wait_policy, openmp_wait_policy
if sys.argv[1] == "late":
    import torch
print("set:", configure_openmp_wait_policy())
import torch
torch.ones(4) + 1
print("policy:", openmp_wait_policy())
"""


def _run(mode: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in hostmem.WAIT_POLICY_ENV}
    full.update(OMP_DISPLAY_ENV="verbose", **env)  # libgomp prints what it read, when it loads
    return subprocess.run([sys.executable, "-P", "-c", SCRIPT, mode], env=full, capture_output=True, text=True,
                          check=True, timeout=120)


def test_passive_wait_policy_reaches_libgomp_when_set_before_torch():
    p = _run("early")
    assert "set: PASSIVE" in p.stdout
    assert "policy: passive (waiting threads sleep; peftlab's default" in p.stdout
    # libgomp's own report: passive means no spinning at all (its default spins 300,000 times)
    assert "GOMP_SPINCOUNT = '0'" in p.stderr, p.stderr[-2000:]


def test_too_late_after_torch_is_loaded_and_said_so():
    p = _run("late")
    assert "set: None" in p.stdout  # libgomp has read its environment already: nothing is changed
    assert "GOMP_SPINCOUNT = '300000'" in p.stderr, p.stderr[-2000:]
    assert "policy: libgomp's default: waiting threads spin first" in p.stdout


def test_a_users_choice_is_kept():
    p = _run("early", GOMP_SPINCOUNT="1000")
    assert "set: None" in p.stdout and "policy: GOMP_SPINCOUNT=1000 (from the environment)" in p.stdout
    assert "GOMP_SPINCOUNT = '1000'" in p.stderr, p.stderr[-2000:]


def test_thread_count_is_capped_at_the_cpus_the_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(hostmem, "_cgroup_cpu_max", lambda: "max 100000")
    assert hostmem.cpu_budget() == 2
    assert hostmem.choose_cpu_threads(None, 16) == (2, "the 2 CPU(s) this process may use (affinity / cgroup quota)")
    assert hostmem.choose_cpu_threads(3, 16) == (3, "train.threads")  # the recipe decides
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert hostmem.choose_cpu_threads(None, 1) == (1, "OMP_NUM_THREADS; train.threads sets it")
    monkeypatch.setattr(hostmem, "_cgroup_cpu_max", lambda: "150000 100000")  # a container's --cpus 1.5
    assert hostmem.cpu_budget() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(hostmem, "_cgroup_cpu_max", lambda: "100000 100000")
    assert hostmem.cpu_budget() == 1


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_budget_of_this_process_is_its_affinity_at_most():
    assert 1 <= hostmem.cpu_budget() <= len(os.sched_getaffinity(0))


def test_the_cli_sets_the_policy_before_torch_loads():
    """`peftlab ...` (peftlab.cli.main) chooses the policy before anything imports torch."""
    script = """
import sys
from peftlab.cli.main import main
assert 'torch' not in sys.modules, 'importing the CLI loaded torch (and its OpenMP runtime)'
try:
    main(['--help'])
except SystemExit:
    pass
import torch
torch.ones(4) + 1
from peftlab.engine.hostmem import openmp_wait_policy
print('policy:', openmp_wait_policy())
"""
    full = {k: v for k, v in os.environ.items() if k not in hostmem.WAIT_POLICY_ENV}
    full["OMP_DISPLAY_ENV"] = "verbose"
    p = subprocess.run([sys.executable, "-P", "-c", script], env=full, capture_output=True, text=True, check=True,
                       timeout=120)
    assert "policy: passive" in p.stdout
    assert "GOMP_SPINCOUNT = '0'" in p.stderr, p.stderr[-2000:]
