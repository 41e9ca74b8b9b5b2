"""Frozen dense weights (input embeddings, output head) kept in 16 bits on fp32 CPU runs, upcast per use.

A CPU run computes in fp32, so a bf16 checkpoint's embeddings and untied head are loaded as fp32 copies: twice
their checkpoint size (2 x 263 MB for a 128k x 1024 vocabulary) for values that came from 16 bits. When every
value of such a frozen weight is exactly representable in bf16 (or fp16) — always the case for a weight read
from a bf16 (fp16) checkpoint — it is stored in that dtype, which loses nothing, and its module instance gets a
forward that upcasts per use:

* embedding: the rows are gathered in 16 bits and only the gathered rows are upcast (exact);
* head: the logits are computed one vocabulary slice at a time with that slice upcast (no fp32 copy of the
  whole head); the fused cross-entropy and the preference log-probs read the 16-bit head vocabulary-outer
  (``torch_ce_online`` in kernels/fused_linear_cross_entropy.py: each slice upcast once per 4,096 rows, the
  softmax accumulated online), so the upcast costs < 1 % of the loss head's GEMMs.

Only exact ``nn.Embedding`` / ``nn.Linear`` instances that do not require grad are touched (scaled embeddings
such as Gemma's, LoRA-wrapped or quantised heads keep their own path); tied weights are converted once and
both modules get the upcasting forward. Nothing changes numerically: the upcast values are the fp32 values.

The streaming 4-bit loader (:mod:`peftlab.model.quantized_load`) goes one step further when
:func:`frozen_16bit_applies`: it puts a 16-bit checkpoint's embeddings / head into the model in their checkpoint
dtype directly (no fp32 copy is ever made, so the load peak drops too), and :func:`compact_frozen_weights` then
gives such an already-16-bit weight the upcasting forward; one it cannot take (e.g. a LoRA-wrapped head) is
upcast to the compute dtype there, as before.
"""
from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

COMPACT_DTYPES = (torch.bfloat16, torch.float16)
HEAD_VOCAB_SLICE = 16384  # rows of the head upcast at a time (16384 x 4096 x 4 B = 256 MB at most)
_MARK = "_peftlab_compute_dtype"


def frozen_16bit_applies(*, enabled: bool, device_type: str, dtype: torch.dtype, unfreeze: Any = None,
                         deepspeed: Any = None) -> bool:
    """Whether a run keeps its frozen embeddings / head in 16 bits (``model.frozen_16bit``): fp32 CPU runs whose
    embeddings and head stay frozen (no ``adapter.unfreeze``) and are not partitioned by DeepSpeed. The one
    rule the loader, :func:`peftlab.model.load.build_model` and the memory planner share."""
    return bool(enabled and device_type == "cpu" and dtype == torch.float32 and not unfreeze and not deepspeed)


def _embedding_forward(self: nn.Embedding, ids: Tensor) -> Tensor:
    out = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                      self.sparse)
    return out.to(getattr(self, _MARK))


def _head_forward(self: nn.Linear, x: Tensor) -> Tensor:
    dtype = getattr(self, _MARK)
    x = x.to(dtype)
    w = self.weight
    out = torch.empty((*x.shape[:-1], w.shape[0]), dtype=dtype, device=x.device)
    for v0 in range(0, w.shape[0], HEAD_VOCAB_SLICE):
        sl = slice(v0, v0 + HEAD_VOCAB_SLICE)
        out[..., sl] = F.linear(x, w[sl].to(dtype), None if self.bias is None else self.bias[sl].to(dtype))
    return out


CHECK_ROWS = 4096  # rows compared at a time: the check's temporaries stay small next to the weight


def _exact_dtype(weight: Tensor) -> torch.dtype | None:
    """The first 16-bit dtype that holds every value of the fp32 ``weight`` exactly, else None (checked in row
    chunks, stopping at the first inexact chunk: no full-size temporary)."""
    for dtype in COMPACT_DTYPES:
        if all(torch.equal(rows.to(dtype).to(rows.dtype), rows) for rows in weight.split(CHECK_ROWS)):
            return dtype
    return None


def compact_frozen_weights(model: nn.Module) -> list[str]:
    """Store the frozen fp32 input embeddings / output head of ``model`` in 16 bits when that is exact; returns
    the names of the modules changed (logged once with the memory saved)."""
    targets: list[tuple[str, nn.Module]] = []
    names = {id(m): n for n, m in model.named_modules()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if module is not None and type(module) in (nn.Embedding, nn.Linear) and id(module) in names:
            targets.append((names[id(module)], module))
    done: dict[int, nn.Parameter] = {}  # id of the fp32 parameter -> its 16-bit replacement (tied: converted once)
    changed, saved = [], 0
    for name, module in targets:
        weight = module.weight
        if id(weight) not in done:
            if weight.requires_grad or (getattr(module, "bias", None) is not None and module.bias.requires_grad):
                continue
            if weight.dtype in COMPACT_DTYPES:  # loaded in its checkpoint dtype (quantized_load): nothing to check
                done[id(weight)] = weight
                saved += weight.numel() * (4 - weight.element_size())
            elif weight.dtype == torch.float32 and (dtype := _exact_dtype(weight.data)) is not None:
                done[id(weight)] = nn.Parameter(weight.data.to(dtype), requires_grad=False)
                saved += weight.numel() * (weight.element_size() - done[id(weight)].element_size())
            else:
                continue
        module.weight = done[id(weight)]
        object.__setattr__(module, _MARK, torch.float32)
        forward = _embedding_forward if isinstance(module, nn.Embedding) else _head_forward
        module.forward = types.MethodType(forward, module)
        changed.append(name)
    if changed:
        logger.info("frozen weights kept in 16 bits and upcast per use: %s (%.0f MB saved)", ", ".join(changed),
                    saved / 2**20)
    _upcast_leftovers(model)
    return changed


def _upcast_leftovers(model: nn.Module) -> None:
    """A weight the loader kept in 16 bits that got no upcasting forward (its module was wrapped or made
    trainable after loading) would meet fp32 activations: it is upcast to fp32, the pre-frozen_16bit layout."""
    for name, module in model.named_modules():
        if hasattr(module, _MARK):
            continue
        for attr, p in module._parameters.items():
            if p is not None and p.dtype in COMPACT_DTYPES and getattr(p, "quant_state", None) is None:
                module._parameters[attr] = nn.Parameter(p.data.float(), requires_grad=p.requires_grad)
                logger.info("%s.%s: kept in fp32 (its module computes in fp32 without a per-use upcast)", name, attr)
