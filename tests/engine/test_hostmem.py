"""peftlab/hostmem.py: with the heap bounded, freed 2 MiB tensors go back to the OS; with glibc's adaptive
default (after a large free has raised its threshold, as every training step does) the heap keeps them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftlab.engine.hostmem import request_huge_pages

SCRIPT = r"""
import json, sys, torch
from peftlab.engine.hostmem import bound_host_heap
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "bounded":
    assert bound_host_heap()
if sys.argv[1] == "trim":  # a heap with little free: no trim (its page faults would cost a small model ~20 %)
    from peftlab.engine.hostmem import heap_free_bytes, release_if_worthwhile
    assert heap_free_bytes() is None or not release_if_worthwhile()  # None: a C library without mallinfo2
big = torch.ones(4 << 20)  # 16 MiB, then freed: glibc's adaptive threshold rises to it (max 32 MiB)
del big
before = rss()
blocks = [torch.ones(1 << 19) for _ in range(64)]  # 64 x 2 MiB activations
pin = torch.ones(1 << 16)  # a 256 KiB live tensor carved above them (no top-of-heap trim)
peak = rss()
del blocks
if sys.argv[1] == "trim":  # host_allocator auto: what the local engine does after each backward
    assert (heap_free_bytes() or 100 << 20) >= 100 << 20  # what the heap kept is what a trim is for
    assert release_if_worthwhile()
print(json.dumps({"held": peak - before, "kept": rss() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator behaviour")
def test_bounded_heap_returns_freed_tensors_and_default_keeps_them():
    out = {}
    for mode in ("bounded", "default", "trim"):
        proc = subprocess.run([sys.executable, "-P", "-c", SCRIPT, mode], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert out["bounded"]["held"] > 120 * mib and out["default"]["held"] > 120 * mib  # both really allocated
    assert out["bounded"]["kept"] < 16 * mib, out    # returned to the OS at free
    assert out["default"]["kept"] > 100 * mib, out   # kept by the heap
    assert out["trim"]["kept"] < 16 * mib, out       # handed back by malloc_trim (host_allocator: auto)


HUGE = r"""
import json, sys, torch
from peftlab.engine.hostmem import request_huge_pages
if sys.argv[1] == "auto":
    assert request_huge_pages()  # before torch's first >= 2 MiB allocation, as the trainer does
x = torch.ones(64 << 20)  # 256 MiB
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        print(json.dumps({"huge": int(line.split()[1]) * 1024}))
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="the kernel gives no transparent huge pages")
def test_auto_backs_large_tensors_with_huge_pages():
    """torch reads THP_MEM_ALLOC_ENABLE at its first large allocation: requested before it, a 256 MiB tensor
    sits (mostly) on huge pages (with THP in ``madvise`` mode, only then); fails if torch stops honouring the
    variable."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = {}
    for mode in ("auto", "default"):
        proc = subprocess.run([sys.executable, "-P", "-c", HUGE, mode], capture_output=True, text=True,
                              timeout=120, check=False, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["huge"]
    # not all 256 MiB: on a fragmented host the kernel may fall back to small pages for part of the range
    assert out["auto"] >= 32 << 20, out
    if _thp_mode() == "madvise":
        assert out["default"] < 64 << 20, out


def test_request_huge_pages_leaves_a_users_choice():
    env: dict[str, str] = {}
    assert request_huge_pages(env) and env == {"THP_MEM_ALLOC_ENABLE": "1"}
    env = {"THP_MEM_ALLOC_ENABLE": "0"}
    assert not request_huge_pages(env) and env == {"THP_MEM_ALLOC_ENABLE": "0"}


@pytest.mark.parametrize("allocator, trims", [("auto", 1), ("default", 0), ("bounded", 0)])
def test_local_engine_hands_the_heap_back_after_each_backward_only_for_auto(allocator, trims, monkeypatch):
    import torch
    from torch import nn

    from peftlab.engine import local

    calls = []
    monkeypatch.setattr(local, "release_if_worthwhile", lambda: calls.append(1))
    model = nn.Linear(3, 2)
    train = SimpleNamespace(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, optimizer="adamw",
                            scheduler="constant", warmup_steps=0, warmup_ratio=0.0, warmup_start="update", max_grad_norm=None,
                            host_allocator=allocator)
    engine = local.LocalEngine(model, train, total_steps=2, device=torch.device("cpu"))
    engine.backward(model(torch.ones(1, 3)).sum())
    assert len(calls) == trims and model.weight.grad is not None
