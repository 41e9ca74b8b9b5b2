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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep `--dist loadgroup` grouping under pytest >= 9.2.

    pytest-xdist (3.8) groups tests by suffixing each marked item's node id with ``@<group>`` on the workers, by
    assigning ``item._nodeid``; pytest 9.2 keeps node ids in ``item._id`` (a NodeId), so that assignment is
    ignored and every xdist_group is silently spread over both workers: module fixtures (the resume chain of
    tests/checkpoint/test_resume.py, ~30 s) were built once per worker, and two torchruns could overlap. This
    hook runs after xdist's and applies the suffix where it did not take; it does nothing when xdist's own
    suffix is there (older pytest, or a fixed xdist) or when the run is not a loadgroup worker."""
    if not getattr(config.option, "loadgroup", False):  # set by xdist on its workers under --dist loadgroup
        return
    _slow_modules_first(items)
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9.2: xdist's own suffix works
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


def _slow_modules_first(items: list[pytest.Item]) -> None:
    """Under xdist only: the test files holding `slow` tests (tens of seconds each) first, each file's tests
    contiguous and in their order. loadgroup hands out the groups first (most tests first), then single tests
    in collection order; long tests last in that order (test_fused_training.py, test_quantized_load.py) could
    leave one worker running them while the other one idles: the short ones at the end fill in instead."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: the order within each file is kept


_TORCH_LINEAR = torch.nn.functional.linear


@pytest.fixture(autouse=True)
def _restore_functional_linear():
    """DeepSpeed ZeRO-3 in this process (tests/engine/test_deepspeed.py builds a one-process ZeRO-3 engine) replaces
    torch.nn.functional.linear process-wide with its memory-efficient wrapper, "until manually reset" (its own
    words), which changes what autograd saves for every later test in the worker (the planner's exact saved-bytes
    test then failed depending on xdist's scheduling). Put it back after every test."""
    yield
    torch.nn.functional.linear = _TORCH_LINEAR


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    """deepspeed.init_distributed (a one-process ZeRO run in this process) sets RANK, LOCAL_RANK and WORLD_SIZE in
    os.environ and leaves them; a later test in the worker that builds a transformers/TRL Trainer then reads
    LOCAL_RANK=0 as a launched run and asks for MASTER_ADDR (test_kto_vs_trl failed so, by xdist's scheduling).
    Put them back as they were after every test."""
    before = {key: os.environ.get(key) for key in DIST_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
