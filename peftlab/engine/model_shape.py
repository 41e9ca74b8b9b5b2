"""What the memory planner knows about a model, counted rather than guessed, and the activations of one layer.

:func:`model_shape` builds the recipe's model on the meta device (no memory, any architecture transformers
knows), swaps its linears for 4-bit ones and injects LoRA exactly as a real run does, and counts weight and
adapter bytes. :func:`layer_activations` is what autograd keeps per token for one decoder layer of
a (Q)LoRA step, on the path the recipe takes (checked against autograd on each path in the tests).
:mod:`peftlab.engine.planner` turns both into a predicted peak.
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
    head_16bit: bool = False        # model.frozen_16bit keeps the frozen head in 16 bits (the CE's online path)
    head_trainable: bool = False    # adapter.unfreeze trains the output head (the loss computes its gradient)
    unfrozen_params: int = 0        # base parameters adapter.unfreeze trains in full (in the model's dtype)
    max_positions: int | None = None  # the config's max_position_embeddings (None: not stated)
    logit_softcap: float | None = None  # the config's final_logit_softcapping (Gemma-2): the fused loss applies it


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


def model_config(name: str, revision: str | None, trust_remote_code: bool) -> Any:
    from peftlab.model.load import resolve_model_path
    from peftlab.model.quantized_load import load_config

    path = resolve_model_path(name, revision=revision)
    try:
        return load_config(path, trust_remote_code=trust_remote_code)
    except PeftlabError:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def model_shape(recipe: Any, dtype: torch.dtype = torch.float32, *, device: str | None = None) -> ModelShape:
    """Build the recipe's model on the meta device (+ 4-bit swap, + LoRA) and count it.

    ``device`` (cpu / cuda; default: where the recipe trains) decides whether ``model.frozen_16bit`` applies:
    then a 16-bit checkpoint's frozen embeddings / untied head count 2 bytes per element, as the run keeps them."""
    from peftlab.model.frozen_weights import frozen_16bit_applies

    config = model_config(recipe.model.name, recipe.model.revision, recipe.model.trust_remote_code)
    if device is None:
        t = recipe.train.device
        device = "cuda" if t == "cuda" or (t == "auto" and torch.cuda.is_available()) else "cpu"
    frozen_16bit = _checkpoint_is_16bit(config) and frozen_16bit_applies(
        enabled=recipe.model.frozen_16bit, device_type=device, dtype=dtype, unfreeze=recipe.adapter.unfreeze,
        deepspeed=recipe.deepspeed)
    a = recipe.adapter
    lora = {"r": a.r, "alpha": a.alpha, "dropout": a.dropout, "target_modules": a.target_modules,
            "use_rslora": a.rslora, "use_dora": a.dora, "layers": a.layers}
    return count_model(config, dtype, quant=recipe.quantization, lora=lora, frozen_16bit=frozen_16bit,
                       trust_remote_code=recipe.model.trust_remote_code, unfreeze=recipe.adapter.unfreeze)


def count_model(config: Any, dtype: torch.dtype, *, quant: Any, lora: dict[str, Any] | None,
                frozen_16bit: bool = False, trust_remote_code: bool = False,
                unfreeze: list[str] | None = None) -> ModelShape:
    """Build ``config``'s model on the meta device in ``dtype``, swap its linears for 4-bit ones as ``quant`` says,
    inject LoRA with the :func:`~peftlab.adapters.lora_inject.inject_lora` arguments ``lora`` (None: no adapter)
    and count it. ``frozen_16bit``: frozen embeddings / untied head are kept in 16 bits (2 bytes per element).
    ``unfreeze``: ``adapter.unfreeze``, resolved by the trainer's own :func:`~peftlab.adapters.freezing.
    unfreeze_modules` (its parameters train: gradient and optimizer state; the output head's gradient is made by
    the loss)."""
    from peftlab.adapters.freezing import unfreeze_modules
    from peftlab.adapters.lora_inject import inject_lora
    from peftlab.model.quantized_load import (
        QuantSettings,
        empty_model,
        frozen_dense_weight_names,
        swap_linears_for_4bit,
    )

    model = empty_model(config, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code)
    sixteen_bit: set[str] = frozen_dense_weight_names(model) if frozen_16bit else set()
    swapped: set[str] = set()
    if quant.mode != "none":
        swapped = set(swap_linears_for_4bit(model, QuantSettings.from_recipe(quant, dtype)))
    names: list[str] = []
    if lora is not None:
        with torch.device("meta"):
            names = inject_lora(model, **lora)
    unfrozen_ids = {id(p) for m in unfreeze_modules(model, list(unfreeze or [])).values() for p in m.parameters()}
    head = model.get_output_embeddings()
    head_trainable = head is not None and id(getattr(head, "weight", None)) in unfrozen_ids
    unfrozen = 0
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
            if id(p) in unfrozen_ids:
                unfrozen += p.numel()
            if name.removesuffix(".base_layer") in swapped and attr == "weight":
                n = int(module.in_features) * int(module.out_features)
                quantized += n
                largest = max(largest, n)
                base_bytes += quantized_bytes(n, quant.blocksize, quant.double_quant)
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
        largest_linear=largest, lora_params=lora_params, lora_modules_per_layer=per_layer,
        lora_r=int(lora["r"]) if lora is not None else 0, head_16bit=bool(sixteen_bit),
        head_trainable=head_trainable, unfrozen_params=unfrozen,
        max_positions=getattr(text, "max_position_embeddings", None),
        logit_softcap=getattr(text, "final_logit_softcapping", None))


def kernels_run_triton(setting: str, device: str) -> bool:
    """Whether the fused kernels run their Triton code in a run on ``device`` with ``kernels: setting`` — what the
    planner counts as "the kernel path" for what autograd keeps and for the losses' paths.

    :func:`peftlab.kernels.nf4.kernel_path` decides which entry points a run calls (``fused_lora_linear``, the fused
    RMSNorm, the fused blocks, the fused losses' Triton backend), but each kernel then asks
    :func:`peftlab.kernels.nf4.use_triton`: with ``kernels: auto`` on CUDA where Triton cannot be imported it runs
    its PyTorch reference (``reference_lora_linear`` keeps what PEFT's LoRA keeps, ``reference_rms_norm`` is
    transformers' op sequence, the losses resolve ``auto`` to their PyTorch paths). The planner runs in the
    environment it plans for, like its CPU baseline probe, so Triton missing here is Triton missing at run time.
    ``kernels: triton`` is counted as asked (a run without Triton refuses it)."""
    from peftlab.kernels.nf4 import kernel_path, use_triton

    if not kernel_path(setting, device):
        return False
    return setting == "triton" or use_triton(setting, torch.device(device), "the memory planner")


@dataclass(frozen=True)
class LayerActivations:
    """Bytes per token that one decoder layer keeps for backward, split by what the recipe can bound.

    ``layer_input``: the layer's own input, when its first norm saves it (fp32 compute, or the fused norm;
    a bf16 eager norm keeps an fp32 copy instead, counted in ``attention``) — under gradient checkpointing it is
    the checkpointed input, already on the books. ``attention``: everything else outside the MLP: both norms'
    saved tensors, q/k/v/o LoRA inputs / masks / rank-wide intermediates, rotated q and k, v, the attention
    output and statistics (eager: the probabilities). ``mlp_input``: the MLP's input when only the MLP chunks
    keep it (each chunk checkpoint saves its slice of it). ``mlp``: gate / up activations and the MLP's LoRA
    tensors — what ``train.mlp_chunk_tokens`` bounds by the chunk."""

    layer_input: int
    attention: int
    mlp_input: int
    mlp: int

    @property
    def total(self) -> int:
        return self.layer_input + self.attention + self.mlp


def layer_activations(shape: ModelShape, *, elem: int, seq_len: int, attn: str, dropout: float,
                      kernel: bool = False, fused_norm: bool = False, fused_blocks: bool = False,
                      device: str = "cpu", sdpa_mask: bool = True, lean: bool = False,
                      mlp_chunked: bool = False) -> LayerActivations:
    """What autograd keeps per token for one decoder layer of a (Q)LoRA step (Llama-family layout), by path.

    Counted from what each op saves (and checked against ``saved_tensors_hooks`` in tests/engine/
    test_model_shape.py on the CPU, the kernel path under the Triton interpreter); 4-bit base matmuls save no
    input; LoRA weights and their rank-wide activations are fp32. ``kernel``: the recipe's ``kernels`` takes the
    fused-kernel path on the device (:func:`peftlab.kernels.nf4.kernel_path`).

    * Norms: transformers' RMSNorm upcasts, so in bf16 it keeps an fp32 copy of its input (4 bytes/element);
      the fused norm (``kernel`` and ``fused_norm``) and any fp32 norm keep the input itself; + 1 fp32 per row.
    * LoRA, kernel path (``fused_lora_linear``): the input in the compute dtype (one tensor for q/k/v, one for
      gate/up), the fp32 rank-wide ``x·Aᵀ``, and with dropout a 1-byte keep-mask per input element — never a
      dropped copy. PyTorch path: ``lora_A`` keeps its fp32 input, a copy per adapted layer when the compute
      dtype is not fp32; with dropout the dropped copy and the mask (the input's dtype on the CPU, bool on CUDA).
    * Attention: rotated q and k, v, the output (flash / SDPA hand o_proj their output without a copy) and the
      log-sum-exp (SDPA with a mask, ``sdpa_mask``: k and v repeated to every head, and the mask in the compute
      dtype); eager: q, k and v repeated to every head, the probabilities (+ their fp32 softmax in 16-bit), the
      output's contiguous copy when o_proj's LoRA keeps its input as it is.
    * MLP: gate, silu(gate), up (and their product when down_proj's LoRA keeps its input as is); the fused
      block keeps only gate and up.
    * ``lean``: the recompute of an offloaded layer (``peftlab.model.lean_recompute.LeanSaved``) keeps the kernel
      path's dropout masks as RNG states, the norms' outputs as their inputs (recomputed) and a 16-bit norm's fp32
      copy as the 16-bit input; the MLP's own (``mlp_chunked``: its chunk checkpoints keep them as autograd
      would, per chunk).
    """
    H, inter, r = shape.hidden, shape.intermediate, shape.lora_r
    q_w, kv_w = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    widths = shape.lora_modules_per_layer
    attn_mods = {k: w for k, w in widths.items() if "mlp" not in k}
    mlp_mods = {k: w for k, w in widths.items() if "mlp" in k}
    lora_f32 = 4
    drop = dropout > 0 and not fused_blocks
    mask_bytes = 1 if kernel or device == "cuda" else lora_f32

    # the two norms: 4 bytes per row each, plus the input itself or its fp32 copy
    layer_input = 0
    attention = 2 * 4
    if elem < 4 and not (kernel and fused_norm):
        attention += 2 * 4 * H
    else:
        layer_input = H * elem
        attention += H * elem  # the attention block's residual output, the second norm's input

    def lora_inputs(mods: dict[str, int], shared: list[int]) -> int:
        """Bytes of what the LoRA layers ``mods`` keep of their inputs; ``shared``: input widths counted once
        (one tensor feeds several layers) when the layers keep the input as it is."""
        n = lora_f32 * r * len(mods)
        if kernel:
            return n + sum(w * elem for w in shared) + (sum(mods.values()) if drop else 0)
        if drop:
            return n + sum(w * (lora_f32 + mask_bytes) for w in mods.values())
        if elem < lora_f32:
            return n + sum(w * lora_f32 for w in mods.values())
        return n + sum(w * elem for w in shared)

    # attention: the normed input (shared by q/k/v), o_proj's input is the attention output (counted below)
    qkv = {k: w for k, w in attn_mods.items() if not k.endswith("o_proj")}
    o = {k: w for k, w in attn_mods.items() if k.endswith("o_proj")}
    attention += lora_inputs(qkv, [H] if qkv else []) + lora_inputs(o, [])
    keeps_input = kernel or (elem >= lora_f32 and not drop)  # LoRA layers keep their input as it is
    if attn == "eager":  # fp32 softmax, then the probabilities in the compute dtype; o_proj's input is a copy
        probs = shape.n_heads * seq_len * (elem + (4 if elem < 4 else 0))
        attention += 3 * q_w * elem + probs + (q_w * elem if keeps_input and o else 0)
    else:  # transformers repeats k / v to every head for SDPA with a mask (CUDA's kernels take GQA only without)
        kv_kept = q_w if attn == "sdpa" and sdpa_mask else kv_w
        attention += (2 * q_w + 2 * kv_kept) * elem + shape.n_heads * 4
        if attn == "sdpa" and sdpa_mask:  # SDPA saves the mask it converted to the compute dtype: seq per token
            attention += seq_len * elem
    # MLP: gate/up share the normed input, down_proj's input is the product
    gate_up = {k: w for k, w in mlp_mods.items() if not k.endswith("down_proj")}
    down = {k: w for k, w in mlp_mods.items() if k.endswith("down_proj")}
    # the MLP's input (one tensor for gate/up): kept by the layers themselves on the kernel path (and fp32
    # without dropout); otherwise only the chunk checkpoints of train.mlp_chunk_tokens keep it
    if fused_blocks and kernel:
        mlp = 2 * inter * elem + lora_f32 * r * len(mlp_mods)
    else:
        mlp = 3 * inter * elem + lora_inputs(gate_up, []) + lora_inputs(down, [inter] if down else [])
    mlp_input = 0
    if keeps_input and gate_up:
        attention += H * elem
    else:
        mlp_input = H * elem
    if lean:
        if kernel and drop:  # keep-masks redrawn from the RNG
            attention -= sum(attn_mods.values())
            mlp -= 0 if mlp_chunked else sum(mlp_mods.values())
        if keeps_input and qkv:  # the first norm's output, recomputed from the layer input
            attention -= H * elem
        if keeps_input and gate_up and not mlp_chunked:  # the second's, from the residual (kept below or above)
            attention -= H * elem
        if elem < 4 and not (kernel and fused_norm):  # fp32 copies -> the 16-bit inputs (the residual kept)
            attention -= 2 * 4 * H - H * elem
    return LayerActivations(layer_input, attention, mlp_input, mlp)
