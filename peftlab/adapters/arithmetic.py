"""The LoRA arithmetic, once: scaling, the update ``ΔW = s·B·A``, the merged weight ``W + ΔW``, DoRA's row norm.

The layer's forward and merge (:mod:`peftlab.adapters.lora_layer`), the streamed merge of a checkpoint
(:mod:`peftlab.export.merge`) and the combination of adapters (:mod:`peftlab.export.combine`) all call these
functions, so "merged model == adapter model" holds bit for bit: the same operations in the same order.
The formulas are PEFT's (``peft/tuners/lora/layer.py``, ``dora.py``), checked against PEFT in
tests/adapters/test_arithmetic.py.

Shapes: ``lora_A`` [r, in], ``lora_B`` [out, r], weights [out, in], DoRA's magnitude [out].
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor


def pattern_value(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``get_pattern_key``): the first key that matches the
    end of the module name (a regex, after a ``.`` or at the start) wins; ``default`` when none does."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_scaling(alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (rank-stabilised scaling)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``ΔW = s·B·A`` in fp32, shape [out, in] (half-precision factors are multiplied in fp32)."""
    return scaling * (lora_B.float() @ lora_A.float())


def dora_weight_norm(weight: Tensor, delta: Tensor) -> Tensor:
    """The per-output-row L2 norm of ``W + ΔW`` (DoRA's ``‖W + s·B·A‖``, shape [out]) in the inputs' dtype."""
    return torch.linalg.norm(weight + delta, dim=1)


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                  magnitude: Tensor | None = None) -> Tensor:
    """The dense fp32 weight that computes what base + LoRA computes: ``W + ΔW``; with DoRA's ``magnitude``
    ``m / ‖W + ΔW‖_row · (W + ΔW)`` (as PEFT merges it). ``weight`` is the base weight (dequantised for
    4-bit bases); everything is summed in fp32 and the caller casts the result once."""
    combined = weight.float() + delta_weight(lora_A, lora_B, scaling)
    if magnitude is None:
        return combined
    norm = torch.linalg.norm(combined, dim=1)
    return (magnitude.float() / norm).view(-1, 1) * combined
