"""``peftlab export --format peft``: an adapter, validated, as PEFT / vLLM / TGI load it.

The adapter is checked before it is written: its config is a LoRA config peftlab and PEFT load, every module
has ``lora_A`` and ``lora_B`` of the rank ``r`` / ``rank_pattern`` says, and — when the base model can be
found — every module is a linear layer of that base with the adapter's in/out sizes. The files are written
as ``adapter_config.json`` + ``adapter_model.safetensors`` (:func:`peftlab.adapters.peft_format.write_adapter`),
with the training recipe and the combination record when the adapter has them.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftlab.adapters.arithmetic import pattern_value
from peftlab.adapters.chat_template import TEMPLATE_FILE
from peftlab.adapters.peft_format import (
    read_adapter_config,
    read_adapter_weights,
    read_lora_updates,
    write_adapter,
)
from peftlab.checkpoint.atomic import atomic_write
from peftlab.errors import PeftlabError
from peftlab.export.combine import PROVENANCE_NAME
from peftlab.export.source import local_model_dir
from peftlab.recipe.from_adapter import ADAPTER_RECIPE_NAME


@dataclass
class PeftExportResult:
    path: Path
    modules: int
    notes: list[str] = field(default_factory=list)


def _check_fits_base(src: Path, updates: dict, base_name: str, base_dir: Path) -> None:
    """Every module of the adapter is a linear layer of the base with the adapter's in/out sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    modules = dict(model.named_modules())
    for name, upd in updates.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise PeftlabError(f"{src}: module {name} is not a linear layer of {base_name}; the adapter "
                               "belongs to another base model")
        if (upd.lora_A.shape[1], upd.lora_B.shape[0]) != (m.in_features, m.out_features):
            raise PeftlabError(
                f"{src}: {name} maps {upd.lora_A.shape[1]} -> {upd.lora_B.shape[0]} features but "
                f"{base_name} has {m.in_features} -> {m.out_features}; wrong base model")


def export_peft(adapter_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, base: str | None = None,
                overwrite: bool = False) -> PeftExportResult:
    """Validate an adapter and write it as ``adapter_config.json`` + ``adapter_model.safetensors``.

    Checks: the config is a LoRA config peftlab/PEFT load; every module has lora_A and lora_B of one
    rank that matches ``r`` / ``rank_pattern``; when the base model can be found, every module exists
    there with the adapter's in/out sizes. Pickle weights (``adapter_model.bin``) are refused unread.
    """
    src, out = Path(adapter_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PeftlabError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite")
    config = read_adapter_config(src)
    updates = read_lora_updates(src, config)
    if not updates:
        raise PeftlabError(f"{src}: the adapter has no LoRA weights")
    for name, upd in updates.items():
        want = pattern_value(config.get("rank_pattern"), name, config["r"])
        if upd.lora_A.shape[0] != want:
            raise PeftlabError(f"{src}: {name} has rank {upd.lora_A.shape[0]} but adapter_config.json says "
                               f"{want} (r / rank_pattern); the config does not belong to these weights")
    notes = []
    base_name = base or config.get("base_model_name_or_path")
    if base_name:
        try:
            base_dir = local_model_dir(base_name)
        except PeftlabError as exc:
            base_dir = None
            notes.append(f"base model not checked: {exc}")
        if base_dir is not None:
            _check_fits_base(src, updates, base_name, base_dir)
            notes.append(f"all {len(updates)} modules fit {base_name}")
    if config.get("use_dora"):
        notes.append("DoRA adapter: PEFT loads it; serving engines may not support DoRA (merge it instead)")
    write_adapter(out, read_adapter_weights(src), config)
    for extra in (ADAPTER_RECIPE_NAME, PROVENANCE_NAME, TEMPLATE_FILE):  # the training chat template travels too
        if (src / extra).is_file() and src.resolve() != out.resolve():
            atomic_write(out / extra, lambda tmp, f=src / extra: shutil.copy2(f, tmp))
    return PeftExportResult(out, len(updates), notes)
