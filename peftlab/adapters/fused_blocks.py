"""Whole-block fused (Q)LoRA forwards on the attention and MLP module instances of a loaded decoder.

:func:`apply_fused_blocks` gives each supported attention module (Llama, Mistral, Qwen2, Gemma-2) and each
SwiGLU MLP (Llama, Mistral, Qwen2) of ONE model a forward of its own (an instance attribute; the transformers
classes are never patched) that runs q/k/v as one autograd node, o as one node and gate/up/down with SwiGLU as
one node (:mod:`peftlab.kernels.fused_lora_block`), with RoPE from ``peftlab.kernels.rope`` when that module
exists (else the model's own ``apply_rotary_pos_emb``). The math is the module's own forward: same attention
function, cache update, sliding window and soft-cap arguments.

Groups that the block Functions do not implement stay on the per-module path (each LoraLinear runs as before),
decided once when applied and logged once with the module names: LoRA dropout > 0, a base bias (Qwen2's q/k/v),
DoRA, 8-bit or other base types, and Gemma-2's GeGLU MLP (gelu_pytorch_tanh: the block Function is SwiGLU
only). At call time a merged adapter, ``kernel_backend="off"`` or a weight that bitsandbytes repacked for its
CPU kernel also take the module's own forward. :func:`remove_fused_blocks` restores the class forwards.
"""
from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from peftlab.adapters.lora_layer import LoraLinear, is_4bit
from peftlab.kernels.fused_lora_block import LoraProjection, lora_gated_mlp, lora_projections
from peftlab.kernels.rope import apply_rope_

logger = logging.getLogger(__name__)

QKV = ("q_proj", "k_proj", "v_proj")
O = ("o_proj",)
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
_MARK = "_peftlab_fused_block"


def _attention_extras(attn: nn.Module) -> dict[str, Any]:
    """The keyword arguments each family's forward hands its attention function beyond Llama's."""
    name = type(attn).__name__
    if name == "MistralAttention":
        return {"sliding_window": getattr(attn.config, "sliding_window", None)}
    if name == "Qwen2Attention":
        return {"sliding_window": attn.sliding_window}
    if name == "Gemma2Attention":
        return {"sliding_window": attn.sliding_window, "softcap": attn.attn_logit_softcapping}
    return {}


ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Gemma2Attention")
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Gemma2MLP")
_SWIGLU_ACTS = ("silu", "swish")


# --------------------------------------------------------------------------------------------------
# which projections can run in a block


def _static_reason(module: nn.Module) -> str | None:
    """Why this projection cannot run inside a block Function (None: it can)."""
    base = module.base_layer if isinstance(module, LoraLinear) else module
    if isinstance(module, LoraLinear):
        if module.use_dora:
            return "DoRA"
        if isinstance(module.lora_dropout, nn.Dropout) and module.lora_dropout.p > 0:
            return "LoRA dropout > 0"
    if not (is_4bit(base) or type(base) is nn.Linear):
        return f"base type {type(base).__name__}"
    if getattr(base, "bias", None) is not None:
        return "bias"
    return None


def _group_reason(parent: nn.Module, names: tuple[str, ...]) -> str | None:
    for name in names:
        child = getattr(parent, name, None)
        if child is None:
            return f"no {name}"
        reason = _static_reason(child)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def _projection(module: nn.Module) -> LoraProjection:
    if isinstance(module, LoraLinear):
        return LoraProjection(module.base_layer, module.lora_A.weight, module.lora_B.weight, module.scaling)
    return LoraProjection(module)


def _plan(parent: nn.Module, names: tuple[str, ...], x: Tensor) -> tuple[list[LoraProjection], str, torch.dtype] | None:
    """(projections, backend, compute dtype) for a call, or None when this call takes the module path."""
    children = [getattr(parent, n) for n in names]
    backend = "auto"
    for child in children:
        base = child.base_layer if isinstance(child, LoraLinear) else child
        if isinstance(child, LoraLinear):
            if child.merged or child.kernel_backend == "off":
                return None
            backend = child.kernel_backend
        if is_4bit(base) and getattr(base.weight.quant_state, "packing_format_for_cpu", False):
            return None
    first = children[0].base_layer if isinstance(children[0], LoraLinear) else children[0]
    # bitsandbytes computes in its compute_dtype (set from the first input when unset); nn.Linear in its own
    dtype = (getattr(first, "compute_dtype", None) or x.dtype) if is_4bit(first) else first.weight.dtype
    return [_projection(c) for c in children], backend, dtype


# --------------------------------------------------------------------------------------------------
# the forwards


def _modeling(module: nn.Module) -> types.ModuleType:
    return sys.modules[type(module).__module__]


def _uses_rope_kernel(q: Tensor) -> bool:
    """Whether q/k are rotated by peftlab's in-place RoPE kernel: on CUDA (the CPU tests of that branch say True)."""
    return q.is_cuda


def _rotate(attn: nn.Module, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """peftlab's in-place RoPE kernel on CUDA (no rotated copies of q and k); on the CPU the model's own rotation,
    which is faster there (bench/bench_rope.py: 13.9 vs 19.8 ms at 512 tokens)."""
    if _uses_rope_kernel(q):
        return apply_rope_(q, k, cos, sin)
    return _modeling(attn).apply_rotary_pos_emb(q, k, cos, sin)


def _project(parent: nn.Module, names: tuple[str, ...], fused: bool, x: Tensor) -> tuple[Tensor, ...]:
    plan = _plan(parent, names, x) if fused else None
    if plan is None:
        return tuple(getattr(parent, n)(x) for n in names)
    projections, backend, dtype = plan
    return tuple(y.to(x.dtype) for y in lora_projections(x.to(dtype), projections, backend=backend))


def _attention_interface(impl: str, eager: Callable) -> Callable:
    """The attention function the model's own forward would call (``get_interface`` is transformers >= 5.2x's
    spelling; earlier 5.x releases index the registry, eager outside it)."""
    get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get is not None:
        return get(impl, eager)
    return eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


def _attention_forward(self: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                       attention_mask: Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                       **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """The family's attention forward with q/k/v and o as block Functions (see the module docstring)."""
    cache = cache if cache is not None else past_key_values
    fused_qkv, fused_o = getattr(self, _MARK)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in _project(self, QKV, fused_qkv, hidden_states))
    cos, sin = position_embeddings
    q, k = _rotate(self, q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    interface = _attention_interface(self.config._attn_implementation, _modeling(self).eager_attention_forward)
    out, weights = interface(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                             scaling=self.scaling, **_attention_extras(self), **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return _project(self, O, fused_o, out)[0], weights


def _mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    plan = _plan(self, GATED_MLP, x)
    if plan is None:
        return type(self).forward(self, x)
    (gate, up, down), backend, dtype = plan
    return lora_gated_mlp(x.to(dtype), gate, up, down, backend=backend).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# applying / removing


def apply_fused_blocks(model: nn.Module) -> dict[str, str]:
    """Give the supported attention/MLP instances of ``model`` block forwards; returns {module group: reason}
    for the groups left on the per-module path (also logged once, with the names)."""
    fallbacks: dict[str, str] = {}
    fused = 0
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ATTENTION_CLASSES:
            groups = []
            for names in (QKV, O):
                reason = _group_reason(module, names)
                if reason is not None:
                    fallbacks[f"{name}.{{{','.join(names)}}}"] = reason
                groups.append(reason is None)
            if any(groups):
                object.__setattr__(module, _MARK, tuple(groups))
                module.forward = types.MethodType(_attention_forward, module)
                fused += sum(groups)
        elif kind in MLP_CLASSES:
            act = getattr(module.config, "hidden_activation", None) or getattr(module.config, "hidden_act", None)
            reason = _group_reason(module, GATED_MLP) if act in _SWIGLU_ACTS else f"GeGLU MLP ({act})"
            if reason is not None:
                fallbacks[f"{name}.{{{','.join(GATED_MLP)}}}"] = reason
                continue
            object.__setattr__(module, _MARK, (True,))
            module.forward = types.MethodType(_mlp_forward, module)
            fused += 1
    logger.info("fused blocks: %d attention/MLP groups run as whole-block autograd nodes", fused)
    if fallbacks:
        logger.warning("fused blocks: %d groups keep the per-module path: %s", len(fallbacks),
                       "; ".join(f"{k} ({v})" for k, v in fallbacks.items()))
    return fallbacks


def remove_fused_blocks(model: nn.Module) -> None:
    """Give every instance :func:`apply_fused_blocks` changed its class forward back."""
    for module in model.modules():
        if _MARK in module.__dict__:
            object.__delattr__(module, _MARK)
            module.__dict__.pop("forward", None)
