"""Streaming 4-bit loading: a 16-bit checkpoint becomes an NF4/FP4 model one tensor at a time.

transformers' ``from_pretrained(..., quantization_config=BitsAndBytesConfig)`` is the usual way to get
a QLoRA base; how much host memory it needs on the way depends on the transformers version (loading
threads, conversion buffers, the 16-bit tensors of a whole shard). Here the order is explicit:

    config.json ──► model skeleton on the meta device (no memory), every linear except the output
    head swapped for a meta ``bitsandbytes.nn.Linear4bit``
    for each shard, for each tensor (read at its offset in the safetensors file into an owned
    buffer — no memory map, see :func:`peftlab.model.shards.iter_tensors`): read ──► cast to the compute dtype ──► quantise
    (4-bit linears) or keep (embeddings, norms, head) ──► put into the skeleton ──► drop the 16-bit copy

so peak host memory is the 4-bit model plus one 16-bit tensor (plus the Python/torch baseline). The
same skeleton builds **randomly initialised** models of any architecture from a config alone (each
linear initialised by the model's own ``_init_weights`` and quantised at once) — what the benchmarks
and scale tests train — and :func:`save_random_checkpoint` writes a sharded 16-bit checkpoint of such
a model without ever holding more than one shard.

The result is what transformers' 4-bit load gives: ``bnb.nn.Linear4bit`` modules whose weight is a
``Params4bit`` with its ``quant_state`` (quantised by ``bitsandbytes.functional.quantize_4bit`` with the
recipe's quant type, double quant, block size and storage dtype), everything else in the compute dtype.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.engine.hostmem import (
    release_freed_memory,  # after each tensor: see load_quantized
)
from peftlab.errors import PeftlabError
from peftlab.model.shards import iter_tensors, plan_shards, write_planned

STORAGE_DTYPES = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float32": torch.float32}


@dataclass(frozen=True)
class QuantSettings:
    """How each linear weight is quantised (the recipe's ``quantization`` section + compute dtype)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.float32
    quant_storage: torch.dtype = torch.uint8

    @classmethod
    def from_recipe(cls, quant: Any, compute_dtype: torch.dtype) -> QuantSettings:
        return cls(quant.mode, quant.double_quant, quant.blocksize, compute_dtype,
                   STORAGE_DTYPES[quant.quant_storage])




# ---- the skeleton --------------------------------------------------------------------------------


def load_config(path_or_config: Any, *, trust_remote_code: bool = False):
    """A transformers config from a config object, a config.json file or a model directory."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(path_or_config, PretrainedConfig):
        return path_or_config
    p = Path(path_or_config)
    if p.is_file():
        p = p.parent
    if not (p / "config.json").is_file():
        raise PeftlabError(f"{path_or_config}: no config.json there; pass a model directory or its config.json")
    return AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)


def empty_model(config: Any, *, dtype: torch.dtype, attn_implementation: str = "sdpa",
                trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (buffers such as RoPE
    frequencies are real: they are computed from the config, not loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(config, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # transformers 5 ties at load time, not in from_config
    return model


def modules_not_to_quantize(model: nn.Module) -> set[str]:
    """Module names kept in 16/32-bit: transformers' own rule (output head, tied weights, last module)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return set(get_keys_to_not_convert(model))


def swap_linears_for_4bit(model: nn.Module, settings: QuantSettings) -> list[str]:
    """Replace each ``nn.Linear`` (except those transformers keeps dense) by a meta ``Linear4bit``.

    Returns the names of the swapped modules. The new modules own no memory until a weight is set
    with :func:`set_4bit_weight`.
    """
    import bitsandbytes as bnb

    keep = modules_not_to_quantize(model)
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(name == k or name.startswith(k + ".") for k in keep):
            continue
        with torch.device("meta"):
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                    compute_dtype=settings.compute_dtype,
                                    compress_statistics=settings.double_quant,
                                    quant_type=settings.quant_type, quant_storage=settings.quant_storage)
        new.weight.blocksize = settings.blocksize
        new.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped.append(name)
    return swapped


# CPU quantisation goes through bitsandbytes' PyTorch kernel, which makes ~5 fp32-sized copies of its
# input (flat fp32 copy, |x|, scaled, clamped, bucket ids): ~1.2 GB for one 14336 x 4096 MLP weight of an
# 8B model, more than the 4-bit model grows by. Quantising that many elements at a time keeps the
# transient at ~100 MB; the blocks are independent, so the result is bit for bit the same.
CPU_QUANT_CHUNK = 1 << 23


def quantize_4bit_cpu_chunked(w: torch.Tensor, settings: QuantSettings):
    """``bitsandbytes.functional.quantize_4bit`` of ``w`` (on the CPU) computed CPU_QUANT_CHUNK elements at a
    time: same packed bytes, absmax and (double-quant) nested state, a fraction of the peak memory."""
    import bitsandbytes.functional as bnbf

    bs = settings.blocksize
    step = max(bs, CPU_QUANT_CHUNK // bs * bs)
    flat = w.reshape(-1)
    packed_parts, absmax_parts = [], []
    for i in range(0, flat.numel(), step):
        p, a = torch.ops.bitsandbytes.quantize_4bit.default(flat[i:i + step], bs, settings.quant_type, torch.uint8)
        packed_parts.append(p)
        absmax_parts.append(a)
    packed, absmax = torch.cat(packed_parts), torch.cat(absmax_parts)
    del packed_parts, absmax_parts
    if settings.quant_storage != torch.uint8:
        packed = packed.squeeze().view(settings.quant_storage).unsqueeze(1)
    code = bnbf.get_4bit_type(settings.quant_type, device=w.device)
    if settings.double_quant:  # as quantize_4bit does it: the nested state of the whole absmax vector
        offset = absmax.mean()
        qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
        state = bnbf.QuantState(absmax=qabsmax, shape=w.shape, dtype=w.dtype, blocksize=bs, code=code,
                                quant_type=settings.quant_type, offset=offset, state2=state2)
    else:
        state = bnbf.QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=bs, code=code,
                                quant_type=settings.quant_type)
    return packed, state


def quantize_weight(weight: torch.Tensor, settings: QuantSettings, device: torch.device | str = "cpu"):
    """``Params4bit`` of a dense [out, in] weight: cast to the compute dtype (as transformers does before
    quantising), moved to ``device``, quantised by bitsandbytes (on the CPU in chunks, see above)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    w = weight.to(device=device, dtype=settings.compute_dtype).contiguous()
    if w.device.type == "cpu" and w.numel() > CPU_QUANT_CHUNK:
        packed, state = quantize_4bit_cpu_chunked(w, settings)
    else:
        packed, state = bnbf.quantize_4bit(w, blocksize=settings.blocksize, compress_statistics=settings.double_quant,
                                           quant_type=settings.quant_type, quant_storage=settings.quant_storage)
    del w
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=settings.blocksize,
                             compress_statistics=settings.double_quant, quant_type=settings.quant_type,
                             quant_storage=settings.quant_storage, bnb_quantized=True)


def set_4bit_weight(module: nn.Module, weight: torch.Tensor, settings: QuantSettings,
                    device: torch.device | str = "cpu") -> None:
    param = quantize_weight(weight, settings, device)
    param.module = module
    module.weight = param
    module.quant_state = param.quant_state


def keep_compute_dtype(model: nn.Module) -> None:
    """Stop bitsandbytes from silently switching 4-bit layers to bf16 math on the CPU.

    On CPUs with AVX512-BF16, ``bnb.nn.Linear4bit`` repacks its weight in place on the first
    eval-mode forward and then computes in bf16 whatever ``compute_dtype`` says — a silent dtype
    downgrade (and the repacked weight no longer dequantises correctly through
    ``bitsandbytes.functional``). peftlab keeps the recipe's compute dtype: the flag is turned off on
    each 4-bit module instance of this model (nothing global is changed).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a dense parameter or buffer into the skeleton (replacing its meta placeholder)."""
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=bool(old.requires_grad)
                                                and value.is_floating_point())
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(name)


def _finish(model: nn.Module, settings: QuantSettings | None, *, device: torch.device) -> nn.Module:
    """Tie weights, check nothing is left on meta, and apply peftlab's 4-bit module settings."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise PeftlabError(f"the checkpoint has no tensor for {shown}; it does not match its config.json. "
                           "Load it with load_base_model(..., loader='transformers') to see transformers' report")
    for b_name, buf in list(model.named_buffers()):
        if buf.device != device:
            _set_tensor(model, b_name, buf.to(device))
    if settings is not None:
        keep_compute_dtype(model)
    model.config.use_cache = False
    model.eval()
    return model


# ---- loading a checkpoint ------------------------------------------------------------------------


def _model_key(key: str, names: set[str], prefix: str) -> str | None:
    """The model's name for a checkpoint key (checkpoints of the bare decoder lack the prefix)."""
    if key in names:
        return key
    if prefix and f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
        return key[len(prefix) + 1:]
    return None


def frozen_dense_weight_names(model: nn.Module) -> set[str]:
    """Parameter names of the plain ``nn.Embedding`` / ``nn.Linear`` input embeddings and output head (what
    ``model.frozen_16bit`` keeps in their checkpoint dtype)."""
    names = {id(m): n for n, m in model.named_modules()}
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if module is not None and type(module) in (nn.Embedding, nn.Linear) and id(module) in names:
            found.add(f"{names[id(module)]}.weight".lstrip("."))
    return found


def load_quantized(path: str | Path, settings: QuantSettings, *, device: torch.device | str = "cpu",
                   attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                   frozen_16bit: bool = False) -> nn.Module:
    """A 4-bit model from a 16/32-bit safetensors checkpoint, streamed tensor by tensor (see module doc).

    ``frozen_16bit``: the input embeddings / output head of a 16-bit checkpoint stay in its dtype instead of
    the compute dtype (:mod:`peftlab.model.frozen_weights` upcasts them per use), so their fp32 copies never
    exist, not even during the load."""
    device = torch.device(device)
    model = empty_model(path, dtype=settings.compute_dtype, attn_implementation=attn_implementation,
                        trust_remote_code=trust_remote_code)
    keep_dtype = frozen_dense_weight_names(model) if frozen_16bit else set()
    swapped = set(swap_linears_for_4bit(model, settings))
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "")
    for key, tensor in iter_tensors(path):
        name = _model_key(key, names, prefix)
        if name is None:
            continue  # e.g. rotary inv_freq of old checkpoints; transformers ignores these too
        mod_name, _, attr = name.rpartition(".")
        if mod_name in swapped and attr == "weight":
            set_4bit_weight(model.get_submodule(mod_name), tensor, settings, device)
        else:
            dtype = settings.compute_dtype if tensor.is_floating_point() else tensor.dtype
            if name in keep_dtype and tensor.dtype in (torch.bfloat16, torch.float16):
                dtype = tensor.dtype
            _set_tensor(model, name, tensor.to(device=device, dtype=dtype))
        del tensor
        release_freed_memory()
    return _finish(model, settings, device=device)


# ---- random initialisation -----------------------------------------------------------------------


def _materialise(model: nn.Module, module: nn.Module, dtype: torch.dtype, device: torch.device,
                 skip: frozenset[str] = frozenset()) -> None:
    """Give ``module``'s own meta parameters (except ``skip``: tied copies) real storage and initialise
    them with the model's own ``_init_weights`` (the init transformers uses for that architecture)."""
    for attr, p in list(module._parameters.items()):
        if p is not None and p.device.type == "meta" and attr not in skip:
            module._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                    requires_grad=p.requires_grad)
    model._init_weights(module)


def _iter_init(model: nn.Module, swapped: set[str], dtype: torch.dtype,
               device: torch.device) -> Iterator[tuple[str, nn.Module, bool]]:
    """Initialise the model module by module in a fixed order; yields (name, module, is_4bit_target)
    after each module's weights exist in ``dtype`` (for 4-bit targets: the dense weight, still
    waiting to be quantised by the caller)."""
    import bitsandbytes as bnb

    tied = tied_parameter_names(model)
    for name, module in model.named_modules():
        skip = frozenset(a for a in module._parameters if (f"{name}.{a}" if name else a) in tied)
        own = [p for a, p in module._parameters.items() if p is not None and a not in skip]
        if not own or all(p.device.type != "meta" for p in own):
            continue
        if name in swapped:
            # Linear4bit is an nn.Linear subclass: a dense temporary weight takes the usual init.
            tmp = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device="meta")
            _materialise(model, tmp, dtype, device)
            module.weight = nn.Parameter(tmp.weight.data, requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(tmp.bias.data, requires_grad=False)
            yield name, module, True
            assert isinstance(module.weight, bnb.nn.Params4bit)
        else:
            _materialise(model, module, dtype, device, skip)
            yield name, module, False


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (e.g. a head tied to the embeddings)."""
    every = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    return set(every) - {n for n, _ in model.named_parameters()}


def random_quantized(config: Any, settings: QuantSettings, *, seed: int = 0, device: torch.device | str = "cpu",
                     attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> nn.Module:
    """A randomly initialised 4-bit model of ``config``'s architecture; each linear is quantised as
    soon as it is initialised, so peak memory is the 4-bit model plus one dense linear."""
    device = torch.device(device)
    model = empty_model(config, dtype=settings.compute_dtype, attn_implementation=attn_implementation,
                        trust_remote_code=trust_remote_code)
    swapped = set(swap_linears_for_4bit(model, settings))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for _, module, is_target in _iter_init(model, swapped, settings.compute_dtype, device):
            if is_target:
                dense = module.weight.data
                set_4bit_weight(module, dense, settings, device)
                del dense
                release_freed_memory()
    finally:
        torch.random.set_rng_state(gen_state)
    return _finish(model, settings, device=device)


def save_random_checkpoint(config: Any, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                           seed: int = 0, max_shard_size: int = 2 << 30, tokenizer: Any = None) -> Path:
    """Write a randomly initialised ``dtype`` checkpoint of ``config`` (safetensors shards + index with
    transformers' names, planned by huggingface_hub's planner in module order) holding at most one shard in memory. The weights are exactly those of
    ``from_config`` + ``_init_weights`` under ``torch.manual_seed(seed)`` module by module, as
    :func:`random_quantized` draws them (so the two agree bit for bit before quantisation)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(config)
    model = empty_model(config, dtype=dtype)
    # The skeleton's meta parameters give every tensor's size up front: the shards are planned as
    # transformers plans them, then each is written as soon as its last tensor has been drawn.
    skeleton = {name: torch.empty(p.shape, dtype=dtype, device="meta") for name, p in model.named_parameters()}
    plan = plan_shards(skeleton, max_shard_size)
    del skeleton

    def drawn() -> Iterator[tuple[str, torch.Tensor]]:
        tied = tied_parameter_names(model)
        # Same module order and init as random_quantized (nothing is swapped: all weights stay dense).
        for name, module, _ in _iter_init(model, set(), dtype, torch.device("cpu")):
            for attr, p in module._parameters.items():
                key = f"{name}.{attr}" if name else attr
                if p is not None and key not in tied:
                    yield key, p.data
            for attr in list(module._parameters):  # free it again: only the shard being filled holds it
                p = module._parameters[attr]
                if p is not None and p.device.type != "meta":
                    module._parameters[attr] = nn.Parameter(p.data.to("meta"), requires_grad=p.requires_grad)

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        write_planned(out, plan, drawn())
    finally:
        torch.random.set_rng_state(gen_state)
    config.dtype = dtype
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
