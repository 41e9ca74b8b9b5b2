"""Putting LoRA layers into a model and taking them out again.

Targets are chosen with PEFT's rules (suffix or regex match, ``layers_to_transform``), so a config
means the same module set here and in PEFT. Injection swaps module *instances* of one model: each
target is replaced in its parent by a :class:`LoraLinear` holding the original object as
``base_layer``; :func:`remove_lora` puts the originals back, :func:`merge_lora` puts plain
``nn.Linear`` layers with ``W + ΔW`` in their place.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from peftlab.adapters.arithmetic import pattern_value
from peftlab.adapters.lora_layer import LoraLinear, check_backend, is_4bit
from peftlab.errors import PeftlabError

ALL_LINEAR = "all-linear"
# Top-level heads that "all-linear" never targets (PEFT's convention for classification models).
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")
# Where the requires_grad flags from before injection are kept, so remove/merge can restore them.
_SAVED_GRAD_FLAGS = "_peftlab_lora_saved_requires_grad"


# --------------------------------------------------------------------------------------------------
# choosing target modules (PEFT's matching rules)


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear and its bitsandbytes subclasses (Linear4bit, Linear8bitLt), never our own wrapper."""
    return isinstance(module, nn.Linear)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
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


def in_layers(
    name: str, layers: Sequence[int] | int | None, layers_pattern: str | Sequence[str] | None = None
) -> bool:
    """Whether the module sits in one of ``layers`` (None or [] means every layer)."""
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = layer_index(name, layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def name_matches(
    name: str,
    target_modules: str | Sequence[str],
    layers: Sequence[int] | int | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
) -> bool:
    """Exactly PEFT's ``check_target_module_exists`` for one module name.

    A string target is a regex matched against the whole name; a list matches a name exactly or as a
    ``.suffix``. As in PEFT, ``layers`` restricts suffix matches only: exact names and regexes ignore it
    (PEFT's LoraConfig refuses layers with a regex; peftlab's inject_lora applies them itself).
    """
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if re.fullmatch(exclude_modules, name):
                return False
        elif name in exclude_modules or any(name.endswith(f".{key}") for key in exclude_modules):
            return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    if not any(name.endswith(f".{key}") for key in target_modules):
        return False
    return in_layers(name, layers, layers_pattern)


def unwrapped_module_names(model: nn.Module) -> list[str]:
    """Module names as the un-adapted model has them (inside a LoraLinear only its own name counts)."""
    names: list[str] = []
    wrappers: set[str] = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(".".join(parts[:i]) in wrappers for i in range(1, len(parts))):
            continue
        names.append(name)
        if isinstance(module, LoraLinear):
            wrappers.add(name)
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """Every linear module of the model (wrapped or not), in model order."""
    names = []
    for name in unwrapped_module_names(model):
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
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            heads = _head_names(model)
            candidates = [n for n in linear if n not in heads]
            pattern: str | list[str] = candidates
        else:
            candidates, pattern = unwrapped_module_names(model), target_modules
        # "all-linear" and regexes take `layers` too here (PEFT's config cannot express that combination;
        # adapter_config writes such a selection out as names PEFT selects identically).
        chosen = [n for n in candidates if n and name_matches(n, pattern, exclude_modules=exclude_modules)
                  and in_layers(n, layers, layers_pattern)]
    else:
        chosen = [n for n in unwrapped_module_names(model)
                  if n and name_matches(n, list(target_modules), layers, layers_pattern, exclude_modules)]
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
        raise PeftlabError(f"LoRA rank r must be a positive integer, got r={r!r} (typical: 8, 16, 64).")
    if not 0.0 <= dropout < 1.0:
        raise PeftlabError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    check_backend(kernel_backend)
    if lora_modules(model):
        raise PeftlabError(
            "the model already has LoRA layers; call peftlab.adapters.lora_inject.remove_lora(model) or merge_lora(model) "
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
        module_r = pattern_value(rank_pattern, name, r)
        module_alpha = pattern_value(alpha_pattern, name, alpha)
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
    """How every LoraLinear computes: "auto" (Triton on CUDA), "triton", "torch", or "off" (base only)."""
    check_backend(backend)
    for module in lora_modules(model).values():
        module.kernel_backend = backend


def _merged_dtype(base: nn.Module) -> torch.dtype:
    if is_4bit(base):
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
