"""Shared helpers for kernel tests (several kernel files use this conftest: add, never remove).

Tolerances follow the project standard: fp32 against the reference at atol 1e-5 / rtol 5e-4; bf16
against the reference computed in fp32 from the same bf16 inputs at atol 5e-3 / rtol 5e-2.
"""
from __future__ import annotations

import pytest
import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 5e-4},
    torch.bfloat16: {"atol": 5e-3, "rtol": 5e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """torch.testing.assert_close at the project tolerance for ``dtype``, comparing in fp32."""
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), **TOLERANCES[dtype],
                               msg=lambda m: f"{what}: {m}")


@pytest.fixture
def seeded() -> torch.Generator:
    """Seed the global RNG (tests are deterministic) and hand out a generator for explicit draws."""
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def assert_kernel_close():
    """The :func:`assert_close` helper as a fixture (conftest modules are not importable by name)."""
    return assert_close
