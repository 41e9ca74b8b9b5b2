"""A recipe from YAML: ``load_recipe(path, overrides)``, ``recipe_from_dict``, ``--set`` overrides, and the
messages a bad recipe gets.

Mistakes end in one :class:`~peftlab.errors.PeftlabError` naming every bad key, what was expected and a
"did you mean" for near-miss key names (including the names practitioners bring from PEFT, TRL, Axolotl
and torchtune, :data:`ALIASES`). ``--set train.lr=1e-4`` overrides go through the same validation.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftlab.checkpoint.atomic import atomic_write_text
from peftlab.errors import PeftlabError
from peftlab.recipe.schema import Recipe, section_model


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) pydantic model found at ``loc`` (for "did you mean")."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return list(current.model_fields)
        current = section_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


# Names practitioners bring from PEFT / TRL / Axolotl / torchtune, mapped to ours.
ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
    "use_dora": "dora", "lora_target_modules": "target_modules", "layers_to_transform": "layers",
    "learning_rate": "lr", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "micro_batch": "micro_batch_size", "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs",
    "num_train_epochs": "epochs", "lr_scheduler": "scheduler", "lr_scheduler_type": "scheduler",
    "optim": "optimizer", "max_grad_norm": "max_grad_norm", "output_dir": "dir", "base_model": "name",
    "sequence_len": "max_seq_len", "max_length": "max_seq_len", "load_in_4bit": "mode",
}


def _suggest(name: str, known: list[str]) -> str | None:
    alias = ALIASES.get(name)
    if alias in known:
        return alias
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            name = str(loc[-1])
            known = _fields_at(Recipe, loc[:-1])
            close = _suggest(name, known)
            hint = f" — did you mean '{'.'.join(str(p) for p in loc[:-1] + (close,))}'?" if close else ""
            allowed = f" (known keys here: {', '.join(known)})" if known else ""
            lines.append(f"  {key}: unknown key{hint}{allowed}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"  {key}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise PeftlabError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise PeftlabError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise PeftlabError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return path, value


def set_nested(raw: dict[str, Any], path: list[str], value: Any, *, where: str) -> None:
    """``raw[a][b][c] = value`` for ``path == [a, b, c]``, creating missing sections; ``where`` prefixes
    the error when a step of the path is a value, not a section."""
    node = raw
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise PeftlabError(f"{where}: '{part}' is not a section")
        node = nxt
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a raw recipe mapping."""
    for item in overrides:
        path, value = _parse_override(item)
        set_nested(raw, path, value, where=f"--set {item!r}")
    return raw


def recipe_from_dict(raw: dict[str, Any], *, source: str = "(dict)", base_dir: str | Path = ".",
                     overrides: list[str] | None = None) -> Recipe:
    """Validate a raw recipe mapping (``--set`` ``overrides`` applied first); ``source`` names it in messages,
    ``base_dir`` is where its relative paths are resolved from."""
    if not isinstance(raw, dict):
        raise PeftlabError(f"invalid recipe {source}: the top level must be a mapping of sections "
                           "(model, quantization, adapter, data, train, eval, output)")
    raw = apply_overrides(json.loads(json.dumps(raw)), overrides or [])
    raw.pop("base_dir", None)
    try:
        recipe = Recipe(**raw, base_dir=str(base_dir))
    except ValidationError as err:
        raise PeftlabError(_format_errors(err, source)) from None
    except ValueError as err:  # raised by validators outside pydantic's wrapping
        raise PeftlabError(f"invalid recipe {source}: {err}") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, validate and return the recipe at ``path`` (YAML, read with ``yaml.safe_load``)."""
    path = Path(path)
    if not path.is_file():
        hint = " (it is a directory; pass the YAML file inside it)" if path.is_dir() else ""
        raise PeftlabError(f"recipe file not found: {path}{hint}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PeftlabError(f"recipe {path} is not valid YAML: {exc}") from None
    return recipe_from_dict(raw or {}, source=str(path), base_dir=path.resolve().parent, overrides=overrides)


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write ``recipe`` as YAML (the copy saved beside an adapter), atomically: never half a recipe."""
    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
