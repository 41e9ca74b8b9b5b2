"""bitsandbytes' import-time notice on AVX512-BF16 CPUs (it could not fetch a 4-bit CPU matmul from the hub: "pip
install kernels") is not shown as a warning once peftlab's console is set up; bitsandbytes' other warnings are, and
PEFTLAB_LOG_LEVEL=debug shows it too. A fresh process each: logging is process-wide."""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import subprocess_env

SCRIPT = """
import logging
from peftlab.metrics.console import setup_logging
setup_logging("info")
ops = logging.getLogger("bitsandbytes.backends.cpu.ops")  # what bitsandbytes/backends/cpu/ops.py logs through
ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
ops.warning("another bitsandbytes warning")
"""


@pytest.mark.parametrize("level", [None, "debug"])
def test_the_hub_kernel_notice_is_debug_only(level):
    env = subprocess_env()
    env.pop("PEFTLAB_LOG_LEVEL", None)
    if level:
        env["PEFTLAB_LOG_LEVEL"] = level
    out = subprocess.run([sys.executable, "-P", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    assert "another bitsandbytes warning" in out.stderr
    assert ("Failed to load CPU gemm_4bit_forward" in out.stderr) == (level == "debug")
