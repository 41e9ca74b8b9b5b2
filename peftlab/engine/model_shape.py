"""What the memory planner knows about a model, counted rather than guessed, and the activations of one layer.

:func:`model_shape` builds the recipe's model on the meta device (no memory, any architecture transformers
knows), swaps its linears for 4-bit ones and injects LoRA exactly as a real run does, and counts weight and
adapter bytes. :func:`activation_bytes_per_token` is what autograd keeps per token for one decoder layer of
a (Q)LoRA step. :mod:`peftlab.engine.planner` turns both into a predicted peak.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from peftlab.errors import PeftlabError


@dataclass
class ModelShape:
    """What the planner needs to know about the model, counted on a meta-device instance."""

    model_type: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    base_weight_bytes: int          # 4-bit packed + quant states + dense params + buffers
    quantized_params: int
    dense_params: int
    largest_linear: int             # elements of the largest 4-bit linear weight (dequantised in backward)
    lora_params: int
    lora_modules_per_layer: dict[str, int] = field(default_factory=dict)  # input width of each LoRA layer
    lora_r: int = 16


def quantized_bytes(n: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of an ``n``-element weight in bitsandbytes' 4-bit format: the packed nibbles and its quant state."""
    packed = (n + 1) // 2
    blocks = math.ceil(n / blocksize)
    if double_quant:  # uint8 absmax + fp32 absmax per 256 of them + 16-entry 4-bit code + 256-entry 8-bit code + offset
        return packed + blocks + 4 * math.ceil(blocks / 256) + 16 * 4 + 256 * 4 + 4
    return packed + 4 * blocks + 16 * 4


def _checkpoint_is_16bit(config: Any) -> bool:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") in ("bfloat16", "float16")


def model_shape(recipe: Any, dtype: torch.dtype = torch.float32, *, device: str | None = None) -> ModelShape:
    """Build the recipe's model on the meta device (+ 4-bit swap, + LoRA) and count it.

    ``device`` (cpu / cuda; default: where the recipe trains) decides whether ``model.frozen_16bit`` applies:
    then a 16-bit checkpoint's frozen embeddings / untied head count 2 bytes per element, as the run keeps them."""
    from peftlab.model.frozen_weights import frozen_16bit_applies
    from peftlab.model.load import resolve_model_path
    from peftlab.model.quantized_load import (
        QuantSettings,
        empty_model,
        frozen_dense_weight_names,
        load_config,
        swap_linears_for_4bit,
    )

    path = resolve_model_path(recipe.model.name, revision=recipe.model.revision)
    try:
        config = load_config(path, trust_remote_code=recipe.model.trust_remote_code)
    except PeftlabError:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    sixteen_bit_checkpoint = _checkpoint_is_16bit(config)  # before empty_model sets config.dtype
    model = empty_model(config, dtype=dtype, attn_implementation="eager",
                        trust_remote_code=recipe.model.trust_remote_code)
    if device is None:
        t = recipe.train.device
        device = "cuda" if t == "cuda" or (t == "auto" and torch.cuda.is_available()) else "cpu"
    sixteen_bit: set[str] = set()
    if sixteen_bit_checkpoint and frozen_16bit_applies(
            enabled=recipe.model.frozen_16bit, device_type=device, dtype=dtype, unfreeze=recipe.adapter.unfreeze,
            deepspeed=recipe.deepspeed):
        sixteen_bit = frozen_dense_weight_names(model)
    q = recipe.quantization
    swapped: set[str] = set()
    if q.mode != "none":
        swapped = set(swap_linears_for_4bit(model, QuantSettings.from_recipe(q, dtype)))
    from peftlab.adapters.lora_inject import inject_lora

    a = recipe.adapter
    with torch.device("meta"):
        names = inject_lora(model, r=a.r, alpha=a.alpha, dropout=a.dropout, target_modules=a.target_modules,
                                 use_rslora=a.rslora, use_dora=a.dora, layers=a.layers)
    quantized = dense = base_bytes = largest = lora_params = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{name}.{attr}"
            if "lora_" in full:
                lora_params += p.numel()
                continue
            if name.removesuffix(".base_layer") in swapped and attr == "weight":
                n = int(module.in_features) * int(module.out_features)
                quantized += n
                largest = max(largest, n)
                base_bytes += quantized_bytes(n, q.blocksize, q.double_quant)
            else:
                dense += p.numel()
                base_bytes += p.numel() * (2 if full.lstrip(".") in sixteen_bit else dtype.itemsize)
    base_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    if not swapped:
        largest = 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = text.num_attention_heads
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // n_heads
    per_layer: dict[str, int] = {}
    layer0 = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.0\.(.+)$")
    for n in names:
        m = layer0.search(n)
        if m:
            per_layer[m.group(1)] = int(model.get_submodule(n).in_features)
    return ModelShape(
        model_type=config.model_type, n_layers=text.num_hidden_layers, hidden=hidden,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden, n_heads=n_heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads, head_dim=head_dim,
        vocab=text.vocab_size, base_weight_bytes=base_bytes, quantized_params=quantized, dense_params=dense,
        largest_linear=largest, lora_params=lora_params, lora_modules_per_layer=per_layer, lora_r=a.r)


def activation_bytes_per_token(shape: ModelShape, *, elem: int, seq_len: int, attn: str, dropout: float) -> int:
    """Bytes autograd keeps per token for one decoder layer of a (Q)LoRA step (Llama-family layout).

    Attention block: layer input (saved by the RMSNorm), normed input (saved by the LoRA A of q/k/v),
    rotated q and k plus v and the attention output (saved by SDPA; + the nh x T softmax rows under
    eager attention), o_proj's contiguous input. MLP block: residual, normed input, gate, silu(gate),
    up and their product (4 x intermediate). LoRA: the r-wide mid activation of every adapted layer,
    and with dropout each adapted layer's own dropped input + its mask. 4-bit base matmuls save no
    input (bitsandbytes keeps only the packed weight). Norm statistics (1 float per token) are noise.
    """
    H, inter = shape.hidden, shape.intermediate
    q_width, kv_width = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    elems = 4 * H + 3 * q_width + 2 * kv_width + 4 * inter + shape.n_heads
    elems += shape.lora_r * len(shape.lora_modules_per_layer)
    per_token = elems * elem
    if attn == "eager":
        per_token += 2 * shape.n_heads * seq_len * elem  # attention probabilities + their matmul input
    if dropout > 0:
        per_token += sum(width * (elem + 1) for width in shape.lora_modules_per_layer.values())
    return per_token
