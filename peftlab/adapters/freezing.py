"""What trains: adapters on chosen layers only, named base modules unfrozen, and per-group learning rates.

- ``adapter.layers`` picks the decoder layers that get adapters: ``[0, 2, "16..31"]`` (inclusive
  ranges), ``"top:8"`` (the last 8 layers — where task-specific features live) or ``"bottom:4"``.
  Ranges are expanded when the recipe is read; top/bottom are resolved against the model's
  ``num_hidden_layers`` before the model is built (:func:`resolve_layers`), so the saved recipe and
  the PEFT ``layers_to_transform`` always hold explicit indices.
- ``adapter.unfreeze`` trains base modules in full (``embeddings``, ``head`` or names), e.g. for new
  tokens; their learning rate is ``adapter.unfreeze_lr``.
- ``adapter.loraplus_lr_ratio`` (LoRA+, Hayou et al. 2024): B matrices learn ``ratio`` x faster than A,
  which speeds up and stabilises LoRA at the same lr for A.

:func:`optimizer_param_groups` turns that into optimizer param groups; every group carries
``lr_scale`` (its lr relative to ``train.lr``) so the schedule and a resume recompute each group's lr.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.errors import PeftlabError

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:\.\.|-|:)\s*(-?\d+)\s*$")
_TOPK = re.compile(r"^\s*(top|bottom)\s*[:=]?\s*(\d+)\s*$")


def parse_layers(v: Any) -> Any:
    """Expand ``"a..b"`` ranges (inclusive) in ``adapter.layers``; ``"top:k"`` / ``"bottom:k"`` stay."""
    if v is None or isinstance(v, int):
        return [v] if isinstance(v, int) else v
    if isinstance(v, str):
        if _TOPK.match(v):
            return v.strip().replace("=", ":").replace(" ", "")
        v = [v]
    if not isinstance(v, list):
        raise ValueError("expected a list of layer indices / 'a..b' ranges, or 'top:k' / 'bottom:k'")  # noqa: TRY004 (pydantic reports ValueError)
    out: list[int] = []
    for item in v:
        if isinstance(item, bool):
            raise ValueError(f"layer {item!r} is not an index")  # noqa: TRY004 (pydantic reports ValueError)
        if isinstance(item, int):
            out.append(item)
            continue
        m = _RANGE.match(str(item))
        if m is None:
            raise ValueError(f"layer {item!r}: expected an index or an inclusive range such as '16..31'")
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise ValueError(f"layer range {item!r} is empty (end before start)")
        out.extend(range(a, b + 1))
    if any(i < 0 for i in out):
        raise ValueError("layer indices start at 0; use 'top:k' for the last k layers")
    return sorted(set(out))


def num_layers(recipe: Any) -> int:
    """The model's decoder-layer count, from its config (no weights are loaded)."""
    from transformers import AutoConfig

    from peftlab.model.load import resolve_model_path

    path = resolve_model_path(recipe.model.name, revision=recipe.model.revision)
    config = AutoConfig.from_pretrained(path, revision=recipe.model.revision,
                                        trust_remote_code=recipe.model.trust_remote_code)
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "num_hidden_layers", None)
    if not n:
        raise PeftlabError(f"adapter.layers={recipe.adapter.layers!r}: the config of {recipe.model.name} has no "
                           "num_hidden_layers; list the layer indices instead")
    return int(n)


def resolve_layers(recipe: Any) -> None:
    """Turn ``adapter.layers: top:k`` / ``bottom:k`` into explicit indices (in place) and check them."""
    layers = recipe.adapter.layers
    if layers is None:
        return
    n = num_layers(recipe)
    if isinstance(layers, str):
        side, k = _TOPK.match(layers).groups()
        k = int(k)
        if not 0 < k <= n:
            raise PeftlabError(f"adapter.layers={layers!r}: the model has {n} layers; choose k in 1..{n}")
        recipe.adapter.layers = list(range(n - k, n)) if side == "top" else list(range(k))
        return
    bad = [i for i in layers if i >= n]
    if bad:
        raise PeftlabError(f"adapter.layers: {bad} do not exist; {recipe.model.name} has layers 0..{n - 1}")


def unfreeze_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Make the named base modules trainable (``embeddings``, ``head`` or suffixes); {name: module}."""
    found: dict[str, nn.Module] = {}
    by_id = {id(m): n for n, m in model.named_modules()}
    for want in names:
        if want in ("embeddings", "head"):
            m = model.get_input_embeddings() if want == "embeddings" else model.get_output_embeddings()
            hits = {by_id[id(m)]: m} if m is not None and id(m) in by_id else {}
        else:
            hits = {n: m for n, m in model.named_modules() if n and (n == want or n.endswith("." + want))
                    and "lora_" not in n}
        if not hits:
            raise PeftlabError(f"adapter.unfreeze: no module {want!r} in {type(model).__name__}; use embeddings, "
                               "head, or a module name such as embed_tokens / lm_head")
        for n, m in hits.items():
            params = list(m.parameters())
            if any(getattr(p, "quant_state", None) is not None or not p.is_floating_point() for p in params):
                raise PeftlabError(f"adapter.unfreeze: {n} is 4-bit quantised and cannot be trained in full; "
                                   "unfreeze unquantised modules (embeddings, head) or set quantization.mode: none")
            for p in params:
                p.requires_grad_(True)
            found[n] = m
    return found


def optimizer_param_groups(model: nn.Module, adapter: Any, lr: float,
                           unfrozen: dict[str, nn.Module] | None = None) -> list[dict[str, Any]]:
    """Param groups: LoRA A (+ DoRA magnitudes, heads) at ``lr``, LoRA B at ``ratio x lr`` (LoRA+),
    unfrozen base modules at ``unfreeze_lr``. Empty groups are left out; every group has ``lr_scale``."""
    unfrozen_ids = {id(p) for m in (unfrozen or {}).values() for p in m.parameters()}
    base, b_mats, full = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in unfrozen_ids:
            full.append(p)
        elif "lora_B" in name:
            b_mats.append(p)
        else:
            base.append(p)
    ratio = adapter.loraplus_lr_ratio or 1.0
    unfreeze_scale = (adapter.unfreeze_lr / lr) if adapter.unfreeze_lr else 1.0
    groups = [{"params": base, "lr": lr, "lr_scale": 1.0, "name": "adapters"},
              {"params": b_mats, "lr": lr * ratio, "lr_scale": ratio, "name": "lora_B"},
              {"params": full, "lr": lr * unfreeze_scale, "lr_scale": unfreeze_scale, "name": "unfrozen"}]
    if ratio == 1.0:  # one group for A and B, as without LoRA+
        groups = [{**groups[0], "params": base + b_mats}, groups[2]]
    return [g for g in groups if g["params"]]


def save_unfrozen(model: nn.Module, unfrozen: dict[str, nn.Module], adapter_dir: Path) -> Path | None:
    """Write the unfrozen modules' weights beside the adapter (``unfrozen_modules.safetensors``)."""
    if not unfrozen:
        return None
    from safetensors.torch import save_file

    from peftlab.checkpoint.atomic import atomic_write

    tensors = {f"{n}.{k}": v.detach().cpu().contiguous() for n, m in unfrozen.items()
               for k, v in m.state_dict().items()}
    return atomic_write(Path(adapter_dir) / "unfrozen_modules.safetensors", lambda tmp: save_file(tensors, str(tmp)))
