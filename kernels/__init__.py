"""Triton kernels and their PyTorch references, importable as ``peftlab.kernels``.

Each op lives in one file holding the Triton kernel(s), the autograd Function that calls them and a
plain-PyTorch reference with the same signature. The engine picks Triton on CUDA and the PyTorch
path elsewhere (``backend="auto"``); a recipe can force either with ``kernels: triton | torch``.

Imports are lazy so that ``import peftlab`` never pays for (or fails on) Triton on machines that
do not use it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # fused loss heads (issue: fused linear cross-entropy / KD loss)
    "fused_linear_cross_entropy": "fused_linear_cross_entropy",
    "reference_linear_cross_entropy": "fused_linear_cross_entropy",
    "fused_linear_kd_loss": "fused_linear_kd_loss",
    "reference_linear_kd_loss": "fused_linear_kd_loss",
    # 4-bit weights and the fused QLoRA linear
    "nf4_dequantize": "nf4",
    "reference_nf4_dequantize": "nf4",
    "fused_lora_linear": "fused_lora_linear",
    "reference_lora_linear": "fused_lora_linear",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peftlab.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def triton_available() -> bool:
    """True when Triton can be imported (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
