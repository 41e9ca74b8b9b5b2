"""The base model of an adapter, as training saw it: where it is, how it was loaded and quantised, its modules.

``peftlab merge``, GGUF export, the fidelity report and adapter combination all start from an adapter
directory and need its base: the one ``--base`` names, else the training recipe stored beside the adapter
(``peftlab_recipe.yaml``, read as untrusted input), else ``base_model_name_or_path`` of the PEFT config —
as a local directory (built-in models are built, hub ids downloaded when a network exists).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.adapters.peft_format import read_adapter_config
from peftlab.errors import PeftlabError
from peftlab.recipe.from_adapter import ADAPTER_RECIPE_NAME, load_adapter_recipe

# Files that make a directory a tokenizer directory (an adapter dir with one of them carries its own).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class BaseQuant:
    """How training quantised the base (the recipe's ``quantization`` section + the load dtype)."""

    mode: str  # nf4 | fp4
    double_quant: bool
    blocksize: int
    quant_storage: str
    load_dtype: torch.dtype  # the dtype weights had when bitsandbytes quantised them


@dataclass
class MergeSource:
    adapter_dir: Path
    adapter_config: dict[str, Any]
    base_name: str  # as the user / recipe / adapter config names it
    base_dir: Path  # a local HF model directory
    recipe: Any | None  # the training Recipe when the adapter dir holds peftlab_recipe.yaml
    quant: BaseQuant | None  # None: training saw a dense base
    load_dtype: torch.dtype | None  # the dtype training loaded the base in (None: unknown, a PEFT adapter)


def local_model_dir(name: str) -> Path:
    """A local directory holding ``name``'s config and safetensors: built-ins, local dirs, hub snapshots."""
    from peftlab.model.load import resolve_model_path

    path = resolve_model_path(name)
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja",
                                                            "*.txt"]))
    except Exception as exc:  # noqa: BLE001 (offline, unknown repo, gated, ...: one message for all)
        raise PeftlabError(
            f"could not get base model {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Pass --base with a local model directory (config.json + *.safetensors), or run where the hub "
            "is reachable."
        ) from None


def _load_dtype(recipe: Any) -> torch.dtype:
    """The dtype the trainer loaded the base in (``model.dtype``; ``auto`` resolved as models.pick_dtype does).

    ``auto`` depends on the device training ran on, which the recipe only records as ``train.device``;
    for ``auto`` the device of this machine is assumed (a GPU run merged on a CPU-only machine should
    pass ``--set model.dtype=bfloat16`` ... or train with an explicit dtype).
    """
    from peftlab.model.load import DTYPES, pick_device, pick_dtype

    if recipe.model.dtype != "auto":
        return DTYPES[recipe.model.dtype]
    device = torch.device("cpu") if recipe.train.device == "cpu" else pick_device("auto")
    return pick_dtype("auto", device)


def resolve_source(adapter_dir: str | os.PathLike[str], base: str | None = None,
                   overrides: list[str] | None = None, *, trust_remote_code: bool = False) -> MergeSource:
    """Find the adapter's base model and how training saw it.

    Order: ``base`` (``--base``), then the training recipe stored in the adapter dir (read as untrusted
    input: it never turns on remote code), then the PEFT config's ``base_model_name_or_path``.
    """
    path = Path(adapter_dir)
    config = read_adapter_config(path)
    recipe = (load_adapter_recipe(path, overrides, trust_remote_code=trust_remote_code)
              if (path / ADAPTER_RECIPE_NAME).is_file() else None)
    name = base or (recipe.model.name if recipe is not None else None) or config.get("base_model_name_or_path")
    if not name:
        raise PeftlabError(
            f"{path}: no base model is named (no {ADAPTER_RECIPE_NAME}, and adapter_config.json has no "
            "base_model_name_or_path); pass --base ID|DIR"
        )
    quant = None
    load_dtype = _load_dtype(recipe) if recipe is not None else None
    if recipe is not None and recipe.quantization.mode != "none":
        q = recipe.quantization
        quant = BaseQuant(q.mode, q.double_quant, q.blocksize, q.quant_storage, load_dtype)
    return MergeSource(path, config, name, local_model_dir(name), recipe, quant, load_dtype)


def model_layout(base_dir: Path) -> tuple[list[str], set[str]]:
    """(every module name in model order, the linear weights a bitsandbytes 4-bit loader quantises).

    Built from the config on the meta device (no weights are read): the module order is what PEFT
    iterates over, and transformers' own ``get_keys_to_not_convert`` says which linear layers stay
    unquantised (the output head, tied weights).
    """
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = set(get_keys_to_not_convert(model))
    except (ImportError, AttributeError):  # other transformers versions: the head is what it always skips
        skip = {"lm_head"}
    names = [n for n, _ in model.named_modules() if n]
    quantised = {f"{n}.weight" for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and n not in skip and n.rsplit(".", 1)[-1] not in skip}
    return names, quantised


def tokenizer_dir(source: MergeSource) -> Path:
    """The tokenizer training used: one saved in the adapter dir, the recipe's ``model.tokenizer``, else the base's."""
    if any((source.adapter_dir / f).is_file() for f in TOKENIZER_FILES):
        return source.adapter_dir
    if source.recipe is not None and source.recipe.model.tokenizer:
        return local_model_dir(source.recipe.model.tokenizer)
    return source.base_dir
