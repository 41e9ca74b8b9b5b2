"""The recipe stored with an adapter (``peftlab_recipe.yaml``), read as untrusted input, and the recipes
``peftlab eval | generate | merge`` rebuild a model from: an adapter directory (peftlab or plain PEFT), a
base model alone, eval data given on the command line.

An adapter directory may come from anyone: nothing in it may turn on remote code (see
:func:`load_adapter_recipe`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from peftlab.data.config import DataConfig
from peftlab.errors import PeftlabError
from peftlab.recipe.parse import recipe_from_dict
from peftlab.recipe.schema import Recipe

logger = logging.getLogger(__name__)

ADAPTER_RECIPE_NAME = "peftlab_recipe.yaml"
INFERENCE_ONLY_DATA = "(none: inference only)"


def load_adapter_recipe(adapter_dir: str | Path, overrides: list[str] | None = None, *,
                        trust_remote_code: bool = False) -> Recipe:
    """The training recipe stored beside an adapter (``peftlab_recipe.yaml``), read as untrusted input.

    An adapter directory may come from anyone, so nothing in it may run code on this machine: a stored
    ``model.trust_remote_code: true`` (or the distillation teacher's) is switched off. Remote code runs
    only when the user asks for it — ``trust_remote_code=True`` (the CLI's ``--trust-remote-code``) or an
    override ``--set model.trust_remote_code=true``.
    """
    path = Path(adapter_dir) / ADAPTER_RECIPE_NAME
    if not path.is_file():
        raise PeftlabError(f"{adapter_dir} has no {ADAPTER_RECIPE_NAME}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PeftlabError(f"{path} is not valid YAML ({exc}); re-save the adapter or pass a recipe") from None
    asked = []
    sections = [("model", raw.get("model") if isinstance(raw, dict) else None)]
    distill = raw.get("distill") if isinstance(raw, dict) else None
    if isinstance(distill, dict):
        sections.append(("distill.teacher", distill.get("teacher")))
    for where, section in sections:
        if isinstance(section, dict) and section.get("trust_remote_code"):
            section["trust_remote_code"] = False
            asked.append(f"{where}.trust_remote_code")
    overrides = list(overrides or []) + (["model.trust_remote_code=true"] if trust_remote_code else [])
    recipe = recipe_from_dict(raw, source=str(path), base_dir=path.resolve().parent, overrides=overrides)
    if asked and not recipe.model.trust_remote_code:
        logger.warning("%s asks for remote code (%s); ignored: files that come with an adapter never run code "
                       "here. If you trust %s, pass --trust-remote-code (or --set model.trust_remote_code=true)",
                       path, ", ".join(asked), recipe.model.name)
    return recipe


def recipe_for_adapter(adapter_dir: str | Path, overrides: list[str] | None = None, *, model: str | None = None,
                       trust_remote_code: bool = False, data: list[str] | None = None) -> Recipe:
    """The recipe that rebuilds the model of an adapter directory for eval / generate / merge.

    A peftlab adapter carries its training recipe (:func:`load_adapter_recipe`). A plain PEFT adapter
    (only ``adapter_config.json`` + weights) gets one made from its config: the base named by
    ``base_model_name_or_path`` (or ``model``), unquantised, default compute dtype. ``model`` also replaces
    a peftlab adapter's base; ``data`` (files) becomes the eval data.
    """
    adapter_dir = Path(adapter_dir)
    extra = list(overrides or [])
    if (adapter_dir / ADAPTER_RECIPE_NAME).is_file():
        if model:
            extra.insert(0, f"model.name={json.dumps(str(model))}")
        recipe = load_adapter_recipe(adapter_dir, extra, trust_remote_code=trust_remote_code)
    else:
        from peftlab.adapters.peft_format import read_adapter_config

        config = read_adapter_config(adapter_dir)  # a clear error when this is not an adapter at all
        base = model or config.get("base_model_name_or_path")
        if not base:
            raise PeftlabError(f"{adapter_dir}/adapter_config.json names no base model (base_model_name_or_path); "
                               "pass --model ID|DIR")
        raw = {"model": {"name": str(base), "trust_remote_code": trust_remote_code},
               "quantization": {"mode": "none"},
               "data": {"train": [{"path": INFERENCE_ONLY_DATA}]}}
        recipe = recipe_from_dict(raw, source=f"{adapter_dir} (PEFT adapter)", base_dir=adapter_dir.resolve(),
                                  overrides=extra)
    if data:
        recipe.data = eval_data_config(recipe.data, data)
    return recipe


def base_model_recipe(model: str, overrides: list[str] | None = None, *, trust_remote_code: bool = False) -> Recipe:
    """A recipe for sampling a base model with no adapter (``peftlab generate --model DIR``): unquantised."""
    raw = {"model": {"name": model, "trust_remote_code": trust_remote_code}, "quantization": {"mode": "none"},
           "data": {"train": [{"path": INFERENCE_ONLY_DATA}]}}
    return recipe_from_dict(raw, source=f"--model {model}", base_dir=Path.cwd(), overrides=overrides)


def eval_data_config(data: DataConfig, files: list[str]) -> DataConfig:
    """``data`` with ``files`` as its eval data (read from the current directory) and nothing else to build:
    ``peftlab eval --data FILE``."""
    specs = [{"path": str(Path(f).expanduser().resolve()), "format": "auto"} for f in files]
    fields = data.model_dump()
    fields.update(train=specs, eval=specs, eval_split=0.0)
    return DataConfig(**fields)


