"""The PEFT adapter file format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's saved names (``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight``,
DoRA ``...lora_magnitude_vector``) and the config is a PEFT ``LoraConfig``, so adapters move freely
between peftlab, PEFT (``PeftModel.from_pretrained`` / ``save_pretrained``) and serving engines.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftlab.adapters.arithmetic import lora_scaling, pattern_value
from peftlab.adapters.lora_inject import (
    inject_lora,
    layer_index,
    lora_modules,
    name_matches,
    remove_lora,
    unwrapped_module_names,
)
from peftlab.errors import PeftlabError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights under PEFT's saved key names (adapter name stripped), detached.

    ``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight`` and, for DoRA,
    ``...lora_magnitude_vector`` (PEFT saves the magnitude without a ``.weight`` suffix).
    """
    return {key: p.detach() for key, p in lora_parameters(model).items()}


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters themselves (not detached) under PEFT's saved key names."""
    params: dict[str, nn.Parameter] = {}
    for name, module in lora_modules(model).items():
        prefix = f"{KEY_PREFIX}{name}."
        params[prefix + "lora_A.weight"] = module.lora_A.weight
        params[prefix + "lora_B.weight"] = module.lora_B.weight
        if module.lora_magnitude_vector is not None:
            params[prefix + "lora_magnitude_vector"] = module.lora_magnitude_vector
    return params


def _describe_targets(model: nn.Module, wrapped: list[str]) -> tuple[list[str], list[int] | None]:
    """The simplest (target_modules, layers_to_transform) that selects exactly ``wrapped`` under PEFT's rules.

    Tries the short suffix names (["q_proj", "v_proj"]), then the suffixes restricted to the layer
    indices in use, then falls back to the full module names (what PEFT itself writes for
    "all-linear"), which always reproduce the set exactly.
    """
    names = [n for n in unwrapped_module_names(model) if n]
    wanted = set(wrapped)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    indices = [layer_index(n) for n in wrapped]
    candidates: list[tuple[list[str], list[int] | None]] = [(suffixes, None)]
    if all(i is not None for i in indices):
        candidates.append((suffixes, sorted(set(indices))))  # type: ignore[type-var]
    for targets, layers in candidates:
        if {n for n in names if name_matches(n, targets, layers)} == wanted:
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
        raise PeftlabError("the model has no LoRA layers; call peftlab.adapters.lora_inject.inject_lora(model, ...) first.")
    for flag in ("use_dora", "use_rslora"):
        if len({getattr(m, flag) for m in modules.values()}) > 1:
            raise PeftlabError(
                f"LoRA layers disagree on {flag}; one PEFT adapter needs one value for all layers."
            )
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


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str,
    extra_config: dict[str, Any] | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) into ``out_dir``.

    ``tensors``: the adapter weights under PEFT's key names when they are not the model's own parameters
    (gathered from the ranks of a ZeRO-3 run); by default :func:`lora_state_dict`. Each file is written
    atomically (:mod:`peftlab.checkpoint.atomic`): a crash never leaves a half-written file under its name.
    """
    out = Path(out_dir)
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path, **(extra_config or {}))
    if tensors is None:
        tensors = lora_state_dict(model)
    return write_adapter(out, tensors, config)


def write_adapter(out_dir: str | os.PathLike[str], tensors: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write ``tensors`` (PEFT key names) and ``config`` as ``adapter_model.safetensors`` + ``adapter_config.json``
    in ``out_dir`` (created when missing), each file atomically (:mod:`peftlab.checkpoint.atomic`): a crash
    never leaves a half-written file under its name."""
    from safetensors.torch import save_file

    from peftlab.checkpoint.atomic import atomic_write, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
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


# Initialisations that leave the base weights alone (PiSSA, OLoRA, CorDA, LoftQ, ... subtract from them).
_INITS_KEEPING_BASE = ("gaussian", "eva", "orthogonal")


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of a PEFT LoRA adapter directory."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise PeftlabError(
            f"adapter directory {str(path)!r} does not exist; pass the folder that save_adapter or PEFT's "
            f"save_pretrained wrote (it holds {CONFIG_NAME} and {WEIGHTS_NAME})."
        )
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
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _INITS_KEEPING_BASE:
        raise PeftlabError(
            f"{config_path}: init_lora_weights={init!r} rewrites the base weights, so this adapter only "
            "works on the base model it modified. Convert it to a plain LoRA with PEFT first: "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<initial adapter dir>)."
        )
    for key, unsupported in _UNSUPPORTED.items():
        if unsupported(config.get(key)):
            raise PeftlabError(
                f"{config_path}: {key}={config[key]!r} is not supported by peftlab's LoRA loader; "
                "merge that adapter with PEFT or re-train it without that option."
            )
    return config


def _normalise_key(key: str) -> str:
    """Map a PEFT state-dict key with an adapter name (``lora_A.default.weight``) to the saved form."""
    key = re.sub(r"\.(lora_A|lora_B)\.[^.]+\.weight$", r".\1.weight", key)
    return re.sub(r"\.lora_magnitude_vector(\.[^.]+)?\.weight$", ".lora_magnitude_vector", key)


def read_adapter_weights(adapter_dir: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of ``adapter_model.safetensors`` under PEFT's saved key names.

    An adapter directory is untrusted input: a pickle ``adapter_model.bin`` is refused without being
    opened (unpickling can run code), and a damaged safetensors file ends in one message naming it.
    """
    adapter_dir = Path(adapter_dir)
    st_path, bin_path = adapter_dir / WEIGHTS_NAME, adapter_dir / LEGACY_WEIGHTS_NAME
    if not st_path.is_file() and bin_path.is_file():
        raise PeftlabError(
            f"{bin_path} is a pickle file; peftlab does not open pickles from adapters (unpickling can run code). "
            "Convert it once, where you trust it, e.g.: python -c \"import torch; from safetensors.torch import "
            f"save_file; save_file(torch.load('{bin_path}', weights_only=True), "
            f"'{st_path}', metadata={{'format': 'pt'}})\""
        )
    if not st_path.is_file():
        raise PeftlabError(f"{WEIGHTS_NAME} is missing in {str(adapter_dir)!r}; the adapter folder is "
                           "incomplete (re-save it, or copy the weights file next to its config).")
    from safetensors.torch import load_file

    try:
        weights = load_file(str(st_path))
    except Exception as exc:  # noqa: BLE001 (SafetensorError, OSError, ...: a damaged file, one message)
        raise PeftlabError(f"{st_path} is corrupt: it is not a readable safetensors file ({exc}). Re-save or "
                           "re-download the adapter; a training run's checkpoints hold earlier copies") from None
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
    weights = read_adapter_weights(path)
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
        params = lora_parameters(model)
        missing, unexpected = params.keys() - weights.keys(), weights.keys() - params.keys()
        if missing or unexpected:
            raise PeftlabError(
                f"adapter weights in {str(path)!r} do not fit the {len(names)} modules its config selects."
                f"\n  missing keys: {_key_list(missing) or 'none'}"
                f"\n  unexpected keys: {_key_list(unexpected) or 'none'}"
                "\nCheck that the adapter was trained on this base model and that its adapter_config.json "
                "belongs to these weights."
            )
        bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(params[k].shape)}"
               for k, v in weights.items() if v.shape != params[k].shape]
        if bad:
            more = f" ... ({len(bad)} in all)" if len(bad) > 5 else ""
            raise PeftlabError(
                f"adapter weights in {str(path)!r} have the wrong shapes (wrong base model or rank?): "
                f"{'; '.join(bad[:5])}{more}"
            )
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(weights[key])
    except BaseException:
        remove_lora(model)
        raise
    for param in params.values():
        param.requires_grad_(trainable)
    return names


# --------------------------------------------------------------------------------------------------
# an adapter's update per module, read from its files (the merge, the combination and the PEFT export)


@dataclass
class LoraUpdate:
    """One module's adapter tensors and scaling, read from a PEFT adapter."""

    lora_A: Tensor  # [r, in]
    lora_B: Tensor  # [out, r]
    scaling: float
    magnitude: Tensor | None = None  # DoRA, [out]


_UPDATE_KEY = re.compile(rf"{re.escape(KEY_PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")


def read_lora_updates(adapter_dir: str | os.PathLike[str], config: dict[str, Any]) -> dict[str, LoraUpdate]:
    """The LoRA update of every module of an adapter, keyed by module name (``model.layers.0...q_proj``).

    The scaling is PEFT's: ``lora_alpha`` (or its ``alpha_pattern`` value) over the rank of the module's
    tensors (its square root with rsLoRA).
    """
    adapter_dir = Path(adapter_dir)
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in read_adapter_weights(adapter_dir).items():
        match = _UPDATE_KEY.fullmatch(key)
        if match is None:
            raise PeftlabError(f"{adapter_dir}: unexpected tensor {key!r} in the adapter weights (a LoRA "
                               "adapter holds ...lora_A.weight, ...lora_B.weight and, for DoRA, "
                               "...lora_magnitude_vector)")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    updates = {}
    use_dora = bool(config.get("use_dora"))
    for name, parts in modules.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise PeftlabError(f"{adapter_dir}: module {name} has only {sorted(parts)}; lora_A and lora_B "
                               "are both needed")
        if use_dora and "lora_magnitude_vector" not in parts:
            raise PeftlabError(f"{adapter_dir}: use_dora is set but {name} has no lora_magnitude_vector")
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise PeftlabError(f"{adapter_dir}: {name} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}: their ranks differ")
        alpha = pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])
        scaling = lora_scaling(alpha, r, use_rslora=bool(config.get("use_rslora")))
        updates[name] = LoraUpdate(a, b, scaling, parts.get("lora_magnitude_vector"))
    return updates
