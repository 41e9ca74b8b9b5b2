"""Test-suite wide setup.

TRITON_INTERPRET must be set before anything imports triton: ``triton.jit`` decides at decoration
time whether a kernel runs compiled or in the interpreter. On this CPU-only machine every Triton
kernel under test runs in the interpreter on CPU tensors. Ahead-of-time compile tests build
``triton.runtime.jit.JITFunction`` objects from the kernels' Python functions themselves, so they are
not affected.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
# One compute thread per test process (and per subprocess a test starts): `make test` runs two pytest
# workers on two cores, and oversubscribed OpenMP threads spin-wait on each other — measured on the CI
# machine class, a 2-thread training step of the tiny model took 8.5 s against 0.2 s single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (only present in the dev workspace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def micro_dir() -> Path:
    """The built-in micro model's directory (built once per machine, no pre-training: seconds)."""
    from peftlab.model.builtin import resolve_builtin

    return resolve_builtin("builtin:micro-llama")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The built-in tiny model's directory (the quickstart's base; built once per machine)."""
    from peftlab.model.builtin import resolve_builtin

    return resolve_builtin("builtin:tiny-llama")
