"""Triton kernels and their PyTorch references, importable as ``peftlab.kernels``.

Each op lives in one file holding the Triton kernel(s), the autograd Function that calls them and a
plain-PyTorch reference with the same signature. The engine picks Triton on CUDA and the PyTorch
path elsewhere (``backend="auto"``); a recipe can force either with ``kernels: triton | torch``.

The public functions are imported eagerly: each file is named after its function, and importing a
submodule sets the package attribute of the same name to the *module*; binding the function here,
after the submodule import, keeps ``from peftlab.kernels import fused_linear_cross_entropy`` the
function however the submodules were imported before. Triton itself is optional inside each file.
"""
from __future__ import annotations

from peftlab.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    reference_linear_cross_entropy,
)
from peftlab.kernels.fused_linear_kd_loss import (
    fused_linear_kd_loss,
    reference_linear_kd_loss,
    topk_kd_loss,
)
from peftlab.kernels.fused_linear_logprobs import (
    fused_linear_sequence_logprobs,
    reference_linear_sequence_logprobs,
)
from peftlab.kernels.fused_lora_block import lora_gated_mlp, lora_projections
from peftlab.kernels.fused_lora_linear import fused_lora_linear, reference_lora_linear
from peftlab.kernels.nf4 import nf4_dequantize, reference_nf4_dequantize
from peftlab.kernels.rms_norm import reference_rms_norm, rms_norm
from peftlab.kernels.rope import apply_rope_, reference_apply_rope_
from peftlab.kernels.swiglu import reference_swiglu, swiglu

__all__ = [
    "apply_rope_",
    "fused_linear_cross_entropy",
    "fused_linear_kd_loss",
    "fused_linear_sequence_logprobs",
    "fused_lora_linear",
    "lora_gated_mlp",
    "lora_projections",
    "nf4_dequantize",
    "reference_apply_rope_",
    "reference_linear_cross_entropy",
    "reference_linear_kd_loss",
    "reference_linear_sequence_logprobs",
    "reference_lora_linear",
    "reference_nf4_dequantize",
    "reference_rms_norm",
    "reference_swiglu",
    "rms_norm",
    "swiglu",
    "topk_kd_loss",
    "triton_available",
]


def triton_available() -> bool:
    """True when Triton can be imported (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
