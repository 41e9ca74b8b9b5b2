"""Model loading: base model (hub id, local dir or built-in) -> optional 4-bit -> LoRA adapters.

Everything goes through transformers' ``from_pretrained`` (the built-in model is a local directory
built on first use), bitsandbytes does the NF4/FP4 quantisation, and peftlab's own LoRA layers
(:mod:`peftlab.adapters`) are injected on the module instances of the loaded model — nothing global in
transformers or PEFT is patched.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.model.builtin import is_builtin, resolve_builtin
from peftlab.model.frozen_weights import compact_frozen_weights, frozen_16bit_applies
from peftlab.model.long_context import apply_activation_offload, apply_mlp_chunking
from peftlab.model.quantized_load import QuantSettings, keep_compute_dtype, load_quantized

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: the current CUDA device when there is one, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PeftlabError("train.device=cuda but no CUDA GPU is visible; use train.device: auto or cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs that support it (else float16), float32 on the CPU."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_model_path(name: str, *, revision: str | None = None) -> str:
    """A loadable path or hub id for ``name``; built-ins are built (once) and cached.

    Local directories must contain a ``config.json``; anything else that is not a hub id fails
    here with a message instead of deep inside transformers.
    """
    if is_builtin(name):
        return str(resolve_builtin(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PeftlabError(
                f"model.name={name!r} is a local path without a config.json; point it at a Hugging Face "
                "model directory (config.json + *.safetensors) or use a hub id such as meta-llama/Llama-3.1-8B"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
        raise PeftlabError(f"model.name={name!r}: no such directory")
    return name  # a hub id; from_pretrained resolves it (or reports it missing offline)


def _hub_error(name: str, exc: Exception, what: str = "model") -> PeftlabError:
    text = str(exc)
    if "trust_remote_code" in text or "custom code" in text:
        return PeftlabError(
            f"the {what} of {name!r} needs its repository's own Python code (its config.json has an auto_map) and "
            "peftlab runs such code only when you ask for it: if you trust it, set model.trust_remote_code: true "
            "in your recipe or pass --trust-remote-code")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    local = Path(name).expanduser().exists()
    why = ("offline mode is on and it is not in the local cache" if offline and not local
           else f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}")
    fix = ("set model.tokenizer to a directory or hub id that has tokenizer files"
           if what == "tokenizer" else
           "use a local model directory, a hub id reachable from this machine, or builtin:tiny-llama")
    return PeftlabError(f"could not load the {what} of {name!r} ({why}); {fix}")


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    local = Path(name).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        # a tokenizer-only directory (model.tokenizer: ../tokenizers/llama3): no config.json needed
        if not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                   "vocab.json")):
            raise PeftlabError(f"tokenizer {name!r}: the directory has no tokenizer files (tokenizer.json, "
                               "tokenizer_config.json, tokenizer.model or vocab.json); point model.tokenizer at one")
        path = str(local)
    else:
        path = resolve_model_path(name, revision=revision)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc, "tokenizer") from None
    if tok.pad_token_id is None:
        # Llama-3 style tokenizers ship without a pad token; padding is never a label, so reusing
        # eos as pad is safe (the data pipeline masks padding by attention, not by token id).
        tok.pad_token = tok.eos_token
    return tok


def load_model_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The transformers config of ``name`` (hub id, local dir, built-in), with peftlab's error messages."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(name, revision=revision), revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None


# Weight files transformers would read with pickle (torch.load); peftlab never unpickles a checkpoint.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_weight_files(name: str, path: str) -> None:
    """A local model directory must hold safetensors weights: pickle checkpoints are refused unread."""
    local = Path(path)
    if not local.is_dir() or any(local.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in local.glob(pattern))
    if pickles:
        raise PeftlabError(
            f"model.name={name!r}: {local} holds only pickle weights ({', '.join(pickles[:3])}); peftlab does not "
            "load pickle files (unpickling can run code). Convert the checkpoint once, where you trust it: "
            f"python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{local}').save_pretrained('{local}', safe_serialization=True)\""
        )
    raise PeftlabError(f"model.name={name!r}: {local} has no weights (*.safetensors); point it at a complete "
                       "Hugging Face model directory")


def attention_implementation(config: Any, requested: str, *, key: str = "model.attn_implementation") -> str:
    """The attention backend to load ``config``'s architecture with: ``requested`` when the architecture
    supports it; ``sdpa`` falls back to ``eager`` (said once) for architectures transformers has no SDPA path
    for (Gemma-2: its attention logits are soft-capped); any other unsupported choice is refused."""
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, AttributeError):  # remote-code or unknown architectures: transformers decides
        return requested
    supported = {"sdpa": getattr(cls, "_supports_sdpa", True),
                 "flash_attention_2": getattr(cls, "_supports_flash_attn", True), "eager": True}
    if supported.get(requested, True):
        return requested
    if requested == "sdpa":
        logger.warning("%s=sdpa: %s has no SDPA attention in transformers; using eager (set %s: eager to "
                       "silence this)", key, cls.__name__, key)
        return "eager"
    raise PeftlabError(f"{key}={requested}: {cls.__name__} does not support it; set {key} to sdpa or eager")


def bnb_config(quant: Any, compute_dtype: torch.dtype):
    """The transformers ``BitsAndBytesConfig`` of a recipe's ``quantization`` section (None: 16-bit)."""
    if quant.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage={"uint8": torch.uint8, **DTYPES}[quant.quant_storage],
    )


def load_base_model(name: str, *, dtype: torch.dtype, device: torch.device, quant: Any = None,
                    attn_implementation: str = "sdpa", revision: str | None = None,
                    trust_remote_code: bool = False, loader: str = "streaming",
                    frozen_16bit: bool = False) -> nn.Module:
    """Load a causal LM in ``dtype`` on ``device``, 4-bit quantised when ``quant.mode`` is nf4/fp4.

    4-bit models from a local safetensors directory are streamed tensor by tensor into a meta-device
    skeleton (:mod:`peftlab.model.quantized_load`: peak memory ≈ the 4-bit model, never the 16-bit one);
    ``loader="transformers"`` (and hub ids, which need transformers' download) use ``from_pretrained``
    with a ``BitsAndBytesConfig`` instead — the same modules, bit for bit.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name, revision=revision)
    check_weight_files(name, path)
    config = load_model_config(name, revision=revision, trust_remote_code=trust_remote_code)
    attn_implementation = attention_implementation(config, attn_implementation)
    if (loader == "streaming" and quant is not None and quant.mode != "none" and Path(path).is_dir()
            and any(Path(path).glob("*.safetensors"))):
        return load_quantized(path, QuantSettings.from_recipe(quant, dtype), device=device,
                              attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                              frozen_16bit=frozen_16bit)
    # use_safetensors: a hub repository with only pickle weights is refused, never unpickled
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation,
                              "revision": revision, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    qcfg = bnb_config(quant, dtype) if quant is not None else None
    if qcfg is not None:
        if quant.blocksize != 64:
            raise PeftlabError("quantization.blocksize: transformers' bitsandbytes loader uses 64; "
                               "other block sizes are not supported when loading")
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": device}  # bitsandbytes quantises as weights land on the device
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None
    if qcfg is None:
        model.to(device)
    else:
        keep_compute_dtype(model)
    model.config.use_cache = False
    return model


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    model_path: str
    lora_modules: list[str]


def build_model(recipe, *, device: torch.device | None = None, adapter_dir: str | Path | None = None,
                trainable: bool = True, with_adapter: bool = True) -> LoadedModel:
    """Model + tokenizer of a recipe, with LoRA adapters: fresh, or loaded from ``adapter_dir`` /
    ``adapter.init_from`` (``with_adapter=False``: the base alone). The kernel backend of the recipe is set
    on every LoRA layer; the chat template saved with a loaded adapter replaces the tokenizer's."""
    from peftlab.adapters.chat_template import use_adapter_template

    device = device or pick_device(recipe.train.device)
    dtype = pick_dtype(recipe.model.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise PeftlabError("model.dtype=float16 is not usable on the CPU; use float32 or bfloat16")
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name, revision=recipe.model.revision,
                               trust_remote_code=recipe.model.trust_remote_code)
    frozen_16bit = frozen_16bit_applies(enabled=recipe.model.frozen_16bit, device_type=device.type, dtype=dtype,
                                        unfreeze=recipe.adapter.unfreeze, deepspeed=recipe.deepspeed)
    model = load_base_model(recipe.model.name, dtype=dtype, device=device, quant=recipe.quantization,
                            attn_implementation=recipe.model.attn_implementation,
                            revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
                            frozen_16bit=frozen_16bit)
    if recipe.train.fused_norm:
        from peftlab.model.fused_norm import apply_fused_norm

        apply_fused_norm(model, backend=recipe.kernels)
    names: list[str] = []
    if with_adapter:
        names = attach_adapters(model, recipe, device, adapter_dir=adapter_dir, trainable=trainable)
        if recipe.train.fused_blocks:
            from peftlab.adapters.fused_blocks import apply_fused_blocks

            apply_fused_blocks(model)
        init_from = recipe.resolve_path(recipe.adapter.init_from) if recipe.adapter.init_from else None
        use_adapter_template(tokenizer, adapter_dir or init_from)
    if frozen_16bit:
        compact_frozen_weights(model)  # 16-bit checkpoint values of the frozen embeddings / head: stored in 16 bits
    if recipe.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if recipe.train.offload_activations:
        apply_activation_offload(model)
    if recipe.train.mlp_chunk_tokens:
        apply_mlp_chunking(model, recipe.train.mlp_chunk_tokens)
    return LoadedModel(model, tokenizer, device, dtype, resolve_model_path(recipe.model.name), names)


def attach_adapters(model: nn.Module, recipe: Any, device: torch.device, *, adapter_dir: str | Path | None = None,
                    trainable: bool = True) -> list[str]:
    """LoRA layers on ``model`` as the recipe says: loaded from ``adapter_dir`` / ``adapter.init_from``,
    or freshly injected; returns the wrapped module names.

    LoRA weights live in fp32 whatever the base compute dtype (mixed precision the QLoRA way): the
    adapter path casts activations to the LoRA dtype and back.
    """
    from peftlab.adapters.lora_inject import inject_lora, lora_modules
    from peftlab.adapters.peft_format import load_adapter

    backend = "torch" if recipe.kernels == "off" else recipe.kernels
    a = recipe.adapter
    source = adapter_dir or (recipe.resolve_path(a.init_from) if a.init_from else None)
    if source is not None:
        names = load_adapter(model, source, kernel_backend=backend, trainable=trainable)
    else:
        names = inject_lora(model, r=a.r, alpha=a.alpha, dropout=a.dropout, target_modules=a.target_modules,
                                 use_rslora=a.rslora, use_dora=a.dora, layers=a.layers, kernel_backend=backend)
    for m in lora_modules(model).values():
        m.lora_A.to(device=device, dtype=torch.float32)
        m.lora_B.to(device=device, dtype=torch.float32)
        if getattr(m, "lora_magnitude_vector", None) is not None:
            m.lora_magnitude_vector.data = m.lora_magnitude_vector.data.to(device=device, dtype=torch.float32)
    return names


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: LoRA weights inside checkpointed blocks keep their
    gradients even though the block inputs (frozen embeddings) do not require grad."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their logical elements, and a DeepSpeed ZeRO-3
    parameter (an empty partition on each rank, ``numel() == 0``) its whole size, ``ds_numel``."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None:
            n = int(torch.Size(p.quant_state.shape).numel())
        elif hasattr(p, "ds_numel"):
            n = int(p.ds_numel)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
