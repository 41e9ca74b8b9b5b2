"""A module peftlab adds to a model (the classification head, a DANN domain head) kept beside the adapter.

Two files each, next to the PEFT ``adapter_model.safetensors`` and never inside it (the module is peftlab's own,
not one of the base model's, so PEFT's ``modules_to_save`` has no place for it): its weights as safetensors and
the config that rebuilds it as JSON, each written atomically. Loading rebuilds the module from its config, loads
the weights (safetensors: no pickle) and registers it on the model instance under its attribute name (never on
the model's class).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from peftlab.checkpoint.atomic import atomic_write_bytes, atomic_write_text
from peftlab.errors import PeftlabError

M = TypeVar("M", bound=nn.Module)


def save_module_files(module: nn.Module, adapter_dir: Path, *, weights_file: str, config_file: str,
                      config: dict[str, Any]) -> None:
    """Write ``module``'s weights (``weights_file``) and ``config`` (``config_file``) into ``adapter_dir``."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(Path(adapter_dir) / weights_file, save(state))
    atomic_write_text(Path(adapter_dir) / config_file, json.dumps(config, indent=2) + "\n")


def load_module_files(model: nn.Module, adapter_dir: Path, *, attr: str, weights_file: str, config_file: str,
                      build: Callable[[dict[str, Any]], M], device: torch.device, what: str = "module") -> M:
    """The module written by :func:`save_module_files`: ``build(config)`` with the saved weights, registered on
    ``model`` as ``attr`` on ``device``. A missing, unreadable or mismatched file is a PeftlabError naming the
    file, the adapter directory and ``what`` the file holds (e.g. "classification head")."""
    d = Path(adapter_dir)
    for name in (config_file, weights_file):
        if not (d / name).is_file():
            raise PeftlabError(
                f"{d / name}: no such file; the adapter directory {d} is incomplete (it holds the LoRA adapter but "
                f"not the {what}, which is saved beside it as {config_file} + {weights_file}). Point at the "
                "adapter/ or best/ directory the run wrote, or copy the whole directory (or re-save the adapter)")
    try:
        cfg = json.loads((d / config_file).read_text())
        module = build(cfg)
        module.load_state_dict(load_file(str(d / weights_file)))
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        # JSONDecodeError is a ValueError; a missing config key a KeyError; a damaged safetensors file a
        # SafetensorError; weights of another shape a RuntimeError from load_state_dict
        raise PeftlabError(
            f"{d}: the {what} files {config_file} + {weights_file} do not load ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); they are damaged or do not belong together. "
            "Re-save the adapter, or point at the directory the run wrote") from None
    model.add_module(attr, module.to(device))
    return module
