"""LoRA for peftlab: the one import for the layer, injection, merging, and PEFT-format files.

peftlab's own LoRA implementation (no PEFT objects at run time) that speaks PEFT's format exactly.
The code lives in :mod:`peftlab.adapters`:

- ``lora_layer``  — :class:`LoraLinear` (plain LoRA, rsLoRA, DoRA; fused-kernel dispatch)
- ``lora_inject`` — :func:`inject_lora`, :func:`remove_lora`, :func:`merge_lora`, target matching
- ``peft_format`` — :func:`save_adapter`, :func:`load_adapter`, :func:`adapter_config`, ...
"""
from __future__ import annotations

from peftlab.adapters.lora_inject import (
    ALL_LINEAR,
    inject_lora,
    linear_module_names,
    lora_modules,
    merge_lora,
    remove_lora,
    select_target_modules,
    set_kernel_backend,
)
from peftlab.adapters.lora_layer import KERNEL_BACKENDS, LoraLinear, base_weight_fp32
from peftlab.adapters.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_config,
    load_adapter,
    lora_state_dict,
    read_adapter_config,
    read_adapter_weights,
    save_adapter,
)

__all__ = [
    "ALL_LINEAR",
    "CONFIG_NAME",
    "KERNEL_BACKENDS",
    "WEIGHTS_NAME",
    "LoraLinear",
    "adapter_config",
    "base_weight_fp32",
    "inject_lora",
    "linear_module_names",
    "load_adapter",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "read_adapter_config",
    "read_adapter_weights",
    "remove_lora",
    "save_adapter",
    "select_target_modules",
    "set_kernel_backend",
]
