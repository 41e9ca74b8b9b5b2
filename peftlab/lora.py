"""LoRA adapters: the layer, injection into a model, merging, and the PEFT file format.

peftlab's own LoRA implementation (no PEFT objects at run time) that speaks PEFT's format exactly:
module names, ``adapter_config.json`` and ``adapter_model.safetensors`` keys are those
``peft.PeftModel.from_pretrained`` reads and ``save_pretrained`` writes, and the forward math
(plain LoRA, rsLoRA scaling, DoRA) is PEFT's, so logits agree to fp32 rounding.

Injection swaps module *instances* of one model: each targeted ``nn.Linear`` (or bitsandbytes
``Linear4bit`` / ``Linear8bitLt``) is replaced in its parent by a :class:`LoraLinear` that holds
the original object as ``base_layer``. :func:`remove_lora` puts the original objects back;
:func:`merge_lora` replaces each wrapper by a plain ``nn.Linear`` holding ``W + ΔW``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.errors import PeftlabError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
KERNEL_BACKENDS = ("auto", "triton", "torch", "off")
ALL_LINEAR = "all-linear"
# Top-level heads that "all-linear" never targets (PEFT's convention for classification models).
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")
# Where the requires_grad flags from before injection are kept, so remove/merge can restore them.
_SAVED_GRAD_FLAGS = "_peftlab_lora_saved_requires_grad"


# --------------------------------------------------------------------------------------------------
# base weights


def _is_4bit(layer: nn.Module) -> bool:
    return type(layer.weight).__name__ == "Params4bit"


def _is_8bit(layer: nn.Module) -> bool:
    return type(layer.weight).__name__ == "Int8Params"


def _unpack_cpu_packed_nf4(weight: Tensor, quant_state: Any) -> Tensor:
    """Dequantise a 4-bit weight that bitsandbytes repacked for its AVX512-BF16 CPU kernel.

    On CPUs with avx512_bf16, ``Linear4bit.forward`` in eval mode (input without grad) rewrites the
    weight in place into a [N, K/2] nibble layout with a bf16 absmax of shape [K/blocksize, N], and
    ``bitsandbytes.functional.dequantize_4bit`` no longer understands it. This undoes the layout
    permutation (as ``_convert_weight_packed_for_cpu_inverse`` does) but keeps the bf16 absmax as the
    kernel uses it, instead of re-quantising it, so the result is exactly the weight the forward uses.
    """
    n, k_half = weight.shape
    k = k_half * 2
    block_n = 32
    packed = weight.view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)  # low 32 then high 32
    codes = codes.reshape(n // block_n, k_half, block_n, 2).transpose(1, 2).reshape(n, k)
    values = quant_state.code.float().to(weight.device)[codes.long()]  # [N, K]
    absmax = quant_state.absmax.float().T  # [N, K / blocksize]
    blocksize = quant_state.blocksize
    return (values.view(n, k // blocksize, blocksize) * absmax.unsqueeze(-1)).view(n, k)


def base_weight_fp32(layer: nn.Module) -> Tensor:
    """The base layer's weight as a dense fp32 [out, in] tensor (NF4/FP4 dequantised), no grad."""
    with torch.no_grad():
        if _is_4bit(layer):
            import bitsandbytes.functional as bnbf

            weight = layer.weight
            quant_state = weight.quant_state
            if getattr(quant_state, "packing_format_for_cpu", False):
                return _unpack_cpu_packed_nf4(weight.data, quant_state)
            return bnbf.dequantize_4bit(weight.data, quant_state).float()
        if _is_8bit(layer):
            raise PeftlabError(
                f"{type(layer).__name__} holds an 8-bit weight: DoRA and merging need a dense or 4-bit base. "
                "Load the base in 4-bit (NF4) or in bf16/fp32 instead."
            )
        return layer.weight.detach().float()


def _base_weight_for_dora(layer: nn.Module, dtype: torch.dtype) -> Tensor:
    """The base weight as PEFT's DoRA sees it (``dequantize_module_weight(...).to(x.dtype)``)."""
    if _is_4bit(layer) or _is_8bit(layer):
        return base_weight_fp32(layer).to(dtype)
    return layer.weight.to(dtype)


# --------------------------------------------------------------------------------------------------
# fused kernel lookup


@functools.lru_cache(maxsize=1)
def _fused_lora_linear() -> Callable[..., Tensor] | None:
    """``peftlab.kernels.fused_lora_linear`` if that kernel exists in this install, else None."""
    import importlib

    try:
        module = importlib.import_module("peftlab.kernels.fused_lora_linear")
    except ImportError:
        return None
    fn = getattr(module, "fused_lora_linear", None)
    return fn if callable(fn) else None


def _check_backend(backend: str) -> str:
    if backend not in KERNEL_BACKENDS:
        raise PeftlabError(f"kernel_backend={backend!r} is not one of {', '.join(KERNEL_BACKENDS)}.")
    return backend


# --------------------------------------------------------------------------------------------------
# the layer


class LoraLinear(nn.Module):
    """A frozen linear base layer plus a trainable low-rank update: ``y = W x + s·B A dropout(x)``.

    Parameter names match PEFT's with the adapter name stripped (``lora_A.weight``,
    ``lora_B.weight``, ``lora_magnitude_vector``), so ``state_dict`` keys map 1:1 onto PEFT's files.
    The LoRA branch runs in the LoRA weights' dtype (fp32 by default) and is cast back to the base
    output dtype, as in PEFT.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        lora_alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: bool = True,
        kernel_backend: str = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise PeftlabError(f"LoRA rank r must be a positive integer, got r={r}.")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)  # frozen; inject_lora/remove_lora save and restore the flags
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling: float = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout: nn.Module = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        device = next(base_layer.parameters()).device
        # nn.Linear's constructor draws its default init like PEFT's does, so under one torch seed
        # peftlab and PEFT consume the RNG identically and produce the same A.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init_lora_weights:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.use_dora = bool(use_dora)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm(self.lora_B.weight @ self.lora_A.weight))
        self.kernel_backend = _check_backend(kernel_backend)
        self.merged = False

    @property
    def lora_parameters(self) -> list[nn.Parameter]:
        params = [self.lora_A.weight, self.lora_B.weight]
        if self.lora_magnitude_vector is not None:
            params.append(self.lora_magnitude_vector)
        return params

    def _weight_norm(self, lora_weight: Tensor, scaling: float | None = None) -> Tensor:
        """Per-output-row L2 norm of ``W + s·BA`` in the LoRA dtype (PEFT's DoRA ``get_weight_norm``)."""
        with torch.no_grad():
            dtype = lora_weight.dtype
            weight = _base_weight_for_dora(self.base_layer, dtype)
            s = self.scaling if scaling is None else scaling
            return torch.linalg.norm(weight + s * lora_weight, dim=1).to(dtype)

    def _use_kernel(self, x: Tensor) -> Callable[..., Tensor] | None:
        if self.use_dora or self.kernel_backend not in ("auto", "triton"):
            return None
        if not (self.kernel_backend == "triton" or x.is_cuda):
            return None
        return _fused_lora_linear()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.kernel_backend == "off":
            return self.base_layer(x)
        kernel = self._use_kernel(x)
        if kernel is not None:
            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
            return kernel(
                x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling,
                dropout_p=p, training=self.training, backend=self.kernel_backend,
            )
        return self.torch_forward(x)

    def torch_forward(self, x: Tensor) -> Tensor:
        """The plain-PyTorch path (PEFT's ``lora.Linear`` / ``lora.Linear4bit`` forward, one adapter)."""
        result = self.base_layer(x)
        if _is_4bit(self.base_layer):
            # bitsandbytes may return a view that autograd cannot modify; PEFT clones here as well.
            result = result.clone()
        out_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        if not self.use_dora:
            return (result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(out_dtype)

        # DoRA: y = m / ‖W + sBA‖_row · (W x + s B A x), the norm treated as a constant (DoRA §4.3).
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result: Tensor | None = result
        else:
            x = self.lora_dropout(x)
            base_result = None
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype)
        weight = _base_weight_for_dora(self.base_layer, x.dtype)
        weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight.detach(), dim=1).to(x.dtype)
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm.detach()).view(1, -1)
        lora_result = self.lora_B(self.lora_A(x))
        if base_result is not None:
            bias = self.base_layer.bias
            if bias is not None:
                base_result = base_result - bias
        else:
            base_result = F.linear(x, weight)
        result = result + (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling
        return result.to(out_dtype)

    def delta_weight(self) -> Tensor:
        """``s·B·A`` in fp32, shape [out, in]."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def merged_weight(self) -> Tensor:
        """The dense fp32 weight that reproduces this layer's output without the LoRA branch."""
        with torch.no_grad():
            weight = base_weight_fp32(self.base_layer)
            combined = weight + self.delta_weight()
            if not self.use_dora:
                return combined
            norm = torch.linalg.norm(combined, dim=1)
            return (self.lora_magnitude_vector.float() / norm).view(-1, 1) * combined

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, use_dora={self.use_dora}, "
            f"kernel_backend={self.kernel_backend!r}"
        )


# --------------------------------------------------------------------------------------------------
# choosing target modules (PEFT's matching rules)


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear and its bitsandbytes subclasses (Linear4bit, Linear8bitLt), never our own wrapper."""
    return isinstance(module, nn.Linear)


def _layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The decoder-layer index in a module name, found the way PEFT's ``layers_to_transform`` does."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _name_matches(
    name: str,
    target_modules: str | Sequence[str],
    layers: Sequence[int] | int | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
) -> bool:
    """PEFT's ``check_target_module_exists`` for one module name (regex string or suffix list)."""
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if re.fullmatch(exclude_modules, name):
                return False
        elif name in exclude_modules or any(name.endswith(f".{key}") for key in exclude_modules):
            return False
    if isinstance(target_modules, str):
        found = re.fullmatch(target_modules, name) is not None
    else:
        found = name in target_modules or any(name.endswith(f".{key}") for key in target_modules)
    if found and layers is not None and not (isinstance(layers, list) and not layers):
        index = _layer_index(name, layers_pattern)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers
    return found


def _model_module_names(model: nn.Module) -> list[str]:
    """Module names as the un-adapted model has them (inside a LoraLinear only its own name counts)."""
    names, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        names.append(name)
        if isinstance(module, LoraLinear):
            inside.append(name)
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """Every linear module of the model (wrapped or not), in model order."""
    names = []
    for name in _model_module_names(model):
        module = model.get_submodule(name) if name else model
        if isinstance(module, LoraLinear) or _is_linear(module):
            names.append(name)
    return names


def _head_names(model: nn.Module) -> set[str]:
    """Output head(s) that "all-linear" skips: the output embeddings and top-level classifier heads."""
    heads: list[nn.Module] = []
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            out = get_output()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            heads.append(out)
    heads += [getattr(model, n) for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    names = {name for name, module in model.named_modules() if any(module is h for h in heads)}
    return names | {n for n in HEAD_NAMES if n in dict(model.named_modules())}


def select_target_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    *,
    layers: Sequence[int] | int | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Names of the modules that LoRA would wrap, in model order (see :func:`inject_lora`)."""
    linear = linear_module_names(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = _head_names(model)
        candidates = [n for n in linear if n not in heads]
        targets: str | Sequence[str] = candidates
    else:
        candidates = _model_module_names(model)
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    chosen = [
        n for n in candidates
        if n and _name_matches(n, targets, layers, layers_pattern, exclude_modules)
    ]
    linear_set = set(linear)
    not_linear = [n for n in chosen if n not in linear_set]
    if not_linear:
        kinds = ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in not_linear[:5])
        raise PeftlabError(
            f"target_modules={target_modules!r} matches modules that are not linear layers: {kinds}. "
            "LoRA wraps nn.Linear and bitsandbytes Linear4bit/Linear8bitLt only; name linear modules "
            f"instead, e.g. {_short_names(linear)}."
        )
    return chosen


def _short_names(names: Iterable[str]) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    return "[" + ", ".join(suffixes) + "]"


# --------------------------------------------------------------------------------------------------
# inject / remove / merge


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The LoraLinear modules of a model by name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_lora(
    model: nn.Module,
    *,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    use_rslora: bool = False,
    use_dora: bool = False,
    layers: Sequence[int] | int | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    init_lora_weights: bool = True,
    kernel_backend: str = "auto",
    layers_pattern: str | Sequence[str] | None = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> list[str]:
    """Wrap the targeted linear modules of ``model`` in :class:`LoraLinear`, in place; freeze the rest.

    ``target_modules`` is ``"all-linear"`` (every linear layer except the output head and
    classification heads), a list of names matched as PEFT does (exact name or ``.name`` suffix),
    or a regex string that must match a whole module name. ``layers`` keeps only modules whose
    decoder-layer index is listed (PEFT's ``layers_to_transform``; here also with ``"all-linear"``).
    ``rank_pattern``/``alpha_pattern`` override r/alpha per module (PEFT's keys: a regex matched at
    the end of the module name). Initialisation draws from the caller's torch RNG: A is
    kaiming-uniform(a=√5) and B is zero, the same draws PEFT makes under the same seed.
    Returns the wrapped module names.
    """
    if not isinstance(r, int) or r <= 0:
        raise PeftlabError(f"LoRA rank r must be a positive integer, got r={r!r} (typical values: 8, 16, 64).")
    if not 0.0 <= dropout < 1.0:
        raise PeftlabError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    _check_backend(kernel_backend)
    if lora_modules(model):
        raise PeftlabError(
            "the model already has LoRA layers; call peftlab.lora.remove_lora(model) or merge_lora(model) "
            "before injecting again."
        )
    names = select_target_modules(
        model, target_modules, layers=layers, layers_pattern=layers_pattern, exclude_modules=exclude_modules
    )
    if not names:
        raise PeftlabError(
            f"no module matched target_modules={target_modules!r}"
            + (f" with layers={layers!r}" if layers is not None else "")
            + (f" and exclude_modules={exclude_modules!r}" if exclude_modules else "")
            + f". The model's linear modules are {_short_names(linear_module_names(model))} "
            f"(full names like {linear_module_names(model)[:3]}); use some of those names or 'all-linear'."
        )
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for name in names:
        module_r = _pattern_value(rank_pattern, name, r)
        module_alpha = _pattern_value(alpha_pattern, name, alpha)
        wrapper = LoraLinear(
            model.get_submodule(name), r=module_r, lora_alpha=module_alpha, dropout=dropout,
            use_rslora=use_rslora, use_dora=use_dora, init_lora_weights=init_lora_weights,
            kernel_backend=kernel_backend,
        )
        _set_submodule(model, name, wrapper)
    object.__setattr__(model, _SAVED_GRAD_FLAGS, saved)
    lora_ids = {id(p) for m in lora_modules(model).values() for p in m.lora_parameters}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_ids)
    return names


def _pattern_value(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key that matches the end of the module name wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _restore_grad_flags(model: nn.Module) -> None:
    saved = getattr(model, _SAVED_GRAD_FLAGS, None)
    if saved is None:
        return
    for name, p in model.named_parameters():
        if name in saved:
            p.requires_grad_(saved[name])
    object.__delattr__(model, _SAVED_GRAD_FLAGS)


def remove_lora(model: nn.Module) -> None:
    """Put the original base modules back (the same objects) and restore requires_grad flags."""
    for name, module in lora_modules(model).items():
        _set_submodule(model, name, module.base_layer)
    _restore_grad_flags(model)


def set_kernel_backend(model: nn.Module, backend: str) -> None:
    """Choose how every LoraLinear computes: "auto" (Triton on CUDA), "triton", "torch", or "off" (base only)."""
    _check_backend(backend)
    for module in lora_modules(model).values():
        module.kernel_backend = backend


def _merged_dtype(base: nn.Module) -> torch.dtype:
    if _is_4bit(base):
        compute = getattr(base, "compute_dtype", None)
        return compute if compute is not None else base.weight.quant_state.dtype
    return base.weight.dtype


def merge_lora(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every LoRA update into its base weight and replace the wrapper by a plain ``nn.Linear``.

    The base weight is taken in fp32 (NF4/FP4 dequantised), ``s·B·A`` (DoRA: the magnitude over the
    row norm of ``W + s·B·A``, as PEFT merges it) is added in fp32, and the sum is cast once to
    ``dtype`` (default: the 4-bit base's compute dtype, or the dense base's dtype). Returns ``model``.
    """
    for name, module in lora_modules(model).items():
        base = module.base_layer
        out_dtype = dtype or _merged_dtype(base)
        weight = module.merged_weight()
        device = weight.device
        merged = nn.Linear(module.in_features, module.out_features, bias=base.bias is not None,
                           device=device, dtype=out_dtype)
        with torch.no_grad():
            merged.weight.copy_(weight.to(out_dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias.detach().to(out_dtype))
        merged.weight.requires_grad_(False)
        if merged.bias is not None:
            merged.bias.requires_grad_(False)
        merged.train(base.training)
        _set_submodule(model, name, merged)
    _restore_grad_flags(model)
    return model


# --------------------------------------------------------------------------------------------------
# the PEFT file format


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights under PEFT's saved key names (adapter name stripped), detached.

    ``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight`` and, for DoRA,
    ``...lora_magnitude_vector`` (PEFT saves the magnitude without a ``.weight`` suffix).
    """
    out: dict[str, Tensor] = {}
    for name, module in lora_modules(model).items():
        prefix = f"{KEY_PREFIX}{name}."
        out[prefix + "lora_A.weight"] = module.lora_A.weight.detach()
        out[prefix + "lora_B.weight"] = module.lora_B.weight.detach()
        if module.lora_magnitude_vector is not None:
            out[prefix + "lora_magnitude_vector"] = module.lora_magnitude_vector.detach()
    return out


def _describe_targets(model: nn.Module, wrapped: list[str]) -> tuple[list[str], list[int] | None]:
    """The simplest (target_modules, layers_to_transform) that selects exactly ``wrapped`` under PEFT's rules.

    Tries the short suffix names (["q_proj", "v_proj"]), then the suffixes restricted to the layer
    indices in use, then falls back to the full module names (what PEFT itself writes for
    "all-linear"), which always reproduce the set exactly.
    """
    names = [n for n in _model_module_names(model) if n]
    wanted = set(wrapped)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    indices = [_layer_index(n) for n in wrapped]
    candidates: list[tuple[list[str], list[int] | None]] = [(suffixes, None)]
    if all(i is not None for i in indices):
        candidates.append((suffixes, sorted(set(indices))))  # type: ignore[type-var]
    for targets, layers in candidates:
        if {n for n in names if _name_matches(n, targets, layers)} == wanted:
            return targets, layers
    return sorted(wanted), None


def _common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def adapter_config(model: nn.Module, *, base_model_name_or_path: str, **extra: Any) -> dict[str, Any]:
    """The ``adapter_config.json`` content (PEFT's LoraConfig) describing the model's LoRA layers.

    Per-module ranks/alphas that differ from the most common one go to ``rank_pattern`` /
    ``alpha_pattern`` keyed by the full module name. ``extra`` keys are added last (and win).
    """
    modules = lora_modules(model)
    if not modules:
        raise PeftlabError("the model has no LoRA layers; call peftlab.lora.inject_lora(model, ...) first.")
    for flag in ("use_dora", "use_rslora"):
        if len({getattr(m, flag) for m in modules.values()}) > 1:
            raise PeftlabError(f"LoRA layers disagree on {flag}; one PEFT adapter needs one value for all layers.")
    targets, layers = _describe_targets(model, list(modules))
    r = _common([m.r for m in modules.values()])
    alpha = _common([m.lora_alpha for m in modules.values()])
    dropouts = [m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0 for m in modules.values()]
    first = next(iter(modules.values()))
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _common(dropouts),
        "target_modules": targets,
        "exclude_modules": None,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "rank_pattern": {re.escape(n): m.r for n, m in modules.items() if m.r != r},
        "alpha_pattern": {re.escape(n): m.lora_alpha for n, m in modules.items() if m.lora_alpha != alpha},
        "use_rslora": first.use_rslora,
        "use_dora": first.use_dora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layer_replication": None,
    }
    config.update(extra)
    return config


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) into ``out_dir``.

    Each file is written to a temporary name and renamed into place, so a crash never leaves a
    half-written file under the final name.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path, **(extra_config or {}))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    _write_atomic(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _write_atomic(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out


# PEFT options whose adapters peftlab cannot reproduce; loading one is refused rather than silently wrong.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "bias": lambda v: v not in (None, "none"),
    "lora_bias": bool,
    "modules_to_save": bool,
    "fan_in_fan_out": bool,
    "layer_replication": bool,
    "target_parameters": bool,
    "trainable_token_indices": bool,
    "use_qalora": bool,
    "alora_invocation_tokens": bool,
}


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of a PEFT LoRA adapter directory."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise PeftlabError(f"adapter directory {str(path)!r} does not exist; pass the folder that save_adapter "
                           f"or PEFT's save_pretrained wrote (it holds {CONFIG_NAME} and {WEIGHTS_NAME}).")
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise PeftlabError(f"{CONFIG_NAME} is missing in {str(path)!r}; a PEFT adapter folder holds "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftlabError(f"{config_path} is not valid JSON ({e}); re-save the adapter.") from None
    if not isinstance(config, dict):
        raise PeftlabError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise PeftlabError(f"{config_path}: peft_type is {peft_type!r}; peftlab loads LoRA adapters only.")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise PeftlabError(f"{config_path}: required key {key!r} is missing or null.")
    if not isinstance(config["r"], int) or config["r"] <= 0:
        raise PeftlabError(f"{config_path}: r must be a positive integer, got {config['r']!r}.")
    for key, unsupported in _UNSUPPORTED.items():
        if unsupported(config.get(key)):
            raise PeftlabError(f"{config_path}: {key}={config[key]!r} is not supported by peftlab's LoRA loader; "
                               "merge that adapter with PEFT or re-train it without that option.")
    return config


def _normalise_key(key: str) -> str:
    """Map a PEFT state-dict key with an adapter name (``lora_A.default.weight``) to the saved form."""
    key = re.sub(r"\.(lora_A|lora_B)\.[^.]+\.weight$", r".\1.weight", key)
    return re.sub(r"\.lora_magnitude_vector(\.[^.]+)?\.weight$", ".lora_magnitude_vector", key)


def _read_weights(adapter_dir: Path) -> dict[str, Tensor]:
    st_path, bin_path = adapter_dir / WEIGHTS_NAME, adapter_dir / LEGACY_WEIGHTS_NAME
    if st_path.is_file():
        from safetensors.torch import load_file

        weights = load_file(str(st_path))
    elif bin_path.is_file():
        weights = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise PeftlabError(f"{WEIGHTS_NAME} is missing in {str(adapter_dir)!r}; the adapter folder is "
                           "incomplete (re-save it, or copy the weights file next to its config).")
    return {_normalise_key(k): v for k, v in weights.items()}


def _key_list(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike[str],
    *,
    kernel_backend: str = "auto",
    trainable: bool = False,
) -> list[str]:
    """Inject LoRA layers described by a PEFT adapter folder and load its weights (strict keys).

    Works for adapters written by :func:`save_adapter` and by PEFT's ``save_pretrained``. On any
    mismatch (missing or unexpected keys, wrong shapes) the model is left as it was and a
    PeftlabError lists the offending keys. With ``trainable=True`` the LoRA weights require grad
    (to resume training); otherwise the whole model is frozen. Returns the wrapped module names.
    """
    path = Path(adapter_dir)
    config = read_adapter_config(path)
    weights = _read_weights(path)
    names = inject_lora(
        model,
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=config["target_modules"],
        use_rslora=bool(config.get("use_rslora")),
        use_dora=bool(config.get("use_dora")),
        layers=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
        exclude_modules=config.get("exclude_modules"),
        init_lora_weights=False,
        kernel_backend=kernel_backend,
        rank_pattern=config.get("rank_pattern"),
        alpha_pattern=config.get("alpha_pattern"),
    )
    try:
        params = _named_lora_params(model)
        missing, unexpected = params.keys() - weights.keys(), weights.keys() - params.keys()
        if missing or unexpected:
            raise PeftlabError(
                f"adapter weights in {str(path)!r} do not fit the model for the modules its config selects "
                f"({len(names)} modules).\n  missing keys: {_key_list(missing) or 'none'}\n  unexpected keys: "
                f"{_key_list(unexpected) or 'none'}\nCheck that the adapter was trained on this base model "
                "and that its adapter_config.json belongs to these weights."
            )
        bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
               for k, v in weights.items() if v.shape != params[k].shape]
        if bad:
            raise PeftlabError(f"adapter weights in {str(path)!r} have the wrong shapes (wrong base model or "
                               f"rank?): {'; '.join(bad[:5])}" + (f" ... ({len(bad)} in all)" if len(bad) > 5 else ""))
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(weights[key])
    except BaseException:
        remove_lora(model)
        raise
    for param in params.values():
        param.requires_grad_(trainable)
    return names


def _named_lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    params: dict[str, nn.Parameter] = {}
    for name, module in lora_modules(model).items():
        prefix = f"{KEY_PREFIX}{name}."
        params[prefix + "lora_A.weight"] = module.lora_A.weight
        params[prefix + "lora_B.weight"] = module.lora_B.weight
        if module.lora_magnitude_vector is not None:
            params[prefix + "lora_magnitude_vector"] = module.lora_magnitude_vector
    return params
