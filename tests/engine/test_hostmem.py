"""peftlab/hostmem.py: with the heap bounded, freed 2 MiB tensors go back to the OS; with glibc's adaptive
default (after a large free has raised its threshold, as every training step does) the heap keeps them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, torch
from peftlab.engine.hostmem import bound_host_heap
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "bounded":
    assert bound_host_heap()
big = torch.ones(4 << 20)  # 16 MiB, then freed: glibc's adaptive threshold rises to it (max 32 MiB)
del big
before = rss()
blocks = [torch.ones(1 << 19) for _ in range(64)]  # 64 x 2 MiB activations
pin = torch.ones(1 << 16)  # a 256 KiB live tensor carved above them (no top-of-heap trim)
peak = rss()
del blocks
print(json.dumps({"held": peak - before, "kept": rss() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator behaviour")
def test_bounded_heap_returns_freed_tensors_and_default_keeps_them():
    out = {}
    for mode in ("bounded", "default"):
        proc = subprocess.run([sys.executable, "-P", "-c", SCRIPT, mode], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert out["bounded"]["held"] > 120 * mib and out["default"]["held"] > 120 * mib  # both really allocated
    assert out["bounded"]["kept"] < 16 * mib, out    # returned to the OS at free
    assert out["default"]["kept"] > 100 * mib, out   # kept by the heap
