"""Combining several LoRA adapters into one: ``peftlab merge --adapters A B --method ties --out DIR``.

The result is one adapter in the PEFT format whose tensors equal what PEFT's
``PeftModel.add_weighted_adapter`` computes (``peft/tuners/lora/model.py``), computed here on the adapter files
alone (no base weights) with PEFT's own combinations (``peft.utils.merge_utils``):

- ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune`` act on A and B
  separately: adapter i's weight ``w_i·s_i`` (``s_i`` its LoRA scaling) is split as
  ``sign·sqrt(|w_i·s_i|)`` on A and ``sqrt(|w_i·s_i|)`` on B, then the method combines the A's and
  the B's (all adapters must share one rank).
- ``cat`` concatenates ``w_i·s_i·A_i`` rows and ``B_i`` columns (rank = the sum of the ranks) — exact.
- ``svd`` and the ``*_svd`` variants combine the full ``ΔW_i = s_i·B_i·A_i`` and factor the result
  back to rank ``svd_rank`` (default: the largest input rank) with an SVD.

The output adapter has ``lora_alpha = r``, so its scaling is 1 and ``B·A`` is the combined ``ΔW``.
DARE's random drops come from torch's global RNG, as in PEFT, seeded with ``seed`` inside
``torch.random.fork_rng`` (so the same seed gives the same adapter, and the caller's RNG is untouched), and are
drawn in PEFT's order (modules in model order; per module the A's of every adapter, then the B's): started
from the state PEFT's RNG is in (``rng_state``), the result is PEFT's exactly.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils import merge_utils
from torch import Tensor

from peftlab.adapters.arithmetic import delta_weight
from peftlab.adapters.chat_template import read_chat_template, save_chat_template
from peftlab.adapters.peft_format import KEY_PREFIX, read_adapter_config, read_lora_updates, write_adapter
from peftlab.checkpoint.atomic import atomic_write, atomic_write_text
from peftlab.errors import PeftlabError
from peftlab.export.source import local_model_dir, model_layout
from peftlab.recipe.from_adapter import ADAPTER_RECIPE_NAME

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_FAMILY = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = LINEAR_FAMILY + ("cat",) + SVD_FAMILY
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune",
                 "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
PROVENANCE_NAME = "peftlab_combine.json"


# --------------------------------------------------------------------------------------------------
# PEFT's merge_utils (the combinations themselves) under a seeded, forked RNG


PEFT_COMBINATIONS = {
    "linear": lambda t, w, density, sign: merge_utils.task_arithmetic(t, w),
    "magnitude_prune": lambda t, w, density, sign: merge_utils.magnitude_prune(t, w, density),
    "ties": lambda t, w, density, sign: merge_utils.ties(t, w, density, sign),
    "dare_linear": lambda t, w, density, sign: merge_utils.dare_linear(t, w, density),
    "dare_ties": lambda t, w, density, sign: merge_utils.dare_ties(t, w, density, sign),
}


def combine_tensors(tensors: list[Tensor], weights: Tensor, method: str, density: float | None,
                    majority_sign_method: str) -> Tensor:
    """One of PEFT's task-arithmetic combinations (``method`` without the ``_svd`` suffix; ``svd`` is linear).

    DARE's random drops draw from torch's global RNG, as in PEFT: :func:`combine_adapters` runs them in a
    forked, seeded RNG so a seed gives one result and the caller's random stream is left as it was.
    """
    base = "linear" if method == "svd" else method.removesuffix("_svd")
    if base not in PEFT_COMBINATIONS:
        raise PeftlabError(f"unknown combination method {method!r}; use one of {', '.join(METHODS)}")
    with warnings.catch_warnings():  # density 1 keeps every value; PEFT warns each time it is asked to prune
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        return PEFT_COMBINATIONS[base](tensors, weights, density, majority_sign_method)


# --------------------------------------------------------------------------------------------------
# adapters on disk


@dataclass
class SourceAdapter:
    path: Path
    config: dict[str, Any]
    A: dict[str, Tensor]  # module name -> lora_A [r, in]
    B: dict[str, Tensor]  # module name -> lora_B [out, r]
    scaling: dict[str, float]

    @property
    def max_rank(self) -> int:
        """PEFT's rank for allocation: r, or the largest rank_pattern value."""
        pattern = self.config.get("rank_pattern") or {}
        return max(self.config["r"], *pattern.values()) if pattern else self.config["r"]


def read_source(path: str | os.PathLike[str]) -> SourceAdapter:
    path = Path(path)
    config = read_adapter_config(path)
    if config.get("use_dora"):
        raise PeftlabError(
            f"{path} is a DoRA adapter: its magnitude vectors cannot be combined with other adapters (PEFT's "
            "add_weighted_adapter re-initialises them from the base weight). Merge each DoRA adapter into "
            "the base with `peftlab merge --adapter DIR`, or combine plain LoRA / rsLoRA adapters."
        )
    updates = read_lora_updates(path, config)
    return SourceAdapter(path, config, {n: u.lora_A for n, u in updates.items()},
                         {n: u.lora_B for n, u in updates.items()}, {n: u.scaling for n, u in updates.items()})


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def module_order(names: set[str], base: str | None) -> list[str]:
    """``names`` in the base model's module order (PEFT's iteration order; it fixes DARE's draws).

    Without a reachable base the order is by layer number and then name — the same set of modules,
    but DARE's random draws then land on modules in a different order than in PEFT.
    """
    if base:
        try:
            order, _ = model_layout(local_model_dir(base))
            position = {n: i for i, n in enumerate(order)}
            if names <= position.keys():
                return sorted(names, key=position.__getitem__)
        except (PeftlabError, OSError, ValueError, KeyError):
            pass
    return sorted(names, key=_natural_key)


def _output_targets(sources: list[SourceAdapter], modules: list[str]) -> dict[str, Any]:
    """The targeting keys of the combined adapter's config.

    When every input adapter wraps the same modules, the first adapter's targeting keys select them
    exactly; otherwise the full module names do (PEFT matches an exact name as a target).
    """
    first = sources[0]
    if all(set(s.A) == set(first.A) for s in sources):
        keys = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
        return {k: first.config.get(k) for k in keys}
    return {"target_modules": list(modules), "layers_to_transform": None, "layers_pattern": None,
            "exclude_modules": None}


# --------------------------------------------------------------------------------------------------
# the combination


@dataclass
class CombineResult:
    out_dir: Path
    method: str
    rank: int
    modules: int


def combine_adapters(
    adapters: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
    out_dir: str | os.PathLike[str],
    *,
    method: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    seed: int | None = 0,
    rng_state: Tensor | None = None,
    base: str | None = None,
    overwrite: bool = False,
) -> CombineResult:
    """Combine ``adapters`` with ``weights`` by ``method`` into one PEFT-format adapter at ``out_dir``.

    ``density`` (0 < density ≤ 1) is required by the pruning methods. DARE draws from torch's CPU RNG in a
    forked state: ``rng_state`` when given (a ``torch.get_rng_state()``), else seeded with ``seed``. ``base`` (default: the first adapter's
    ``base_model_name_or_path``) only fixes the module order.
    """
    if method not in METHODS:
        raise PeftlabError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if len(adapters) < 1:
        raise PeftlabError("--adapters: name at least one adapter directory")
    if len(weights) != len(adapters):
        raise PeftlabError(f"--weights: {len(weights)} weight(s) for {len(adapters)} adapter(s); give one "
                           "weight per adapter, in the same order")
    if majority_sign_method not in ("total", "frequency"):
        raise PeftlabError(f"majority_sign_method {majority_sign_method!r}: use total or frequency")
    if len(adapters) == 1:
        method = "linear"  # PEFT: one adapter can only be combined linearly
    if method in NEEDS_DENSITY:
        if density is None:
            raise PeftlabError(f"--method {method} prunes: pass --density (the fraction of values kept, e.g. 0.5)")
        if not 0.0 < density <= 1.0:
            raise PeftlabError(f"--density {density}: must be in (0, 1]")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PeftlabError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite")
    sources = [read_source(a) for a in adapters]
    ranks = [s.max_rank for s in sources]
    if method in LINEAR_FAMILY:
        module_ranks = {t.shape[0] for s in sources for t in s.A.values()}
        if len(set(ranks)) != 1 or len(module_ranks) != 1:
            raise PeftlabError(
                f"--method {method} combines A and B matrices entry by entry, so all adapters need one rank "
                f"(got ranks {ranks}); use --method cat or svd for adapters of different ranks"
            )
        new_rank = ranks[0]
    elif method == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    names = set().union(*(s.A for s in sources))
    order = module_order(names, base or sources[0].config.get("base_model_name_or_path"))
    tensors: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=[]):  # the CPU RNG only: every tensor here is on the CPU
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        else:
            torch.default_generator.manual_seed(int(seed or 0))
        for name in order:
            present = [(s, w) for s, w in zip(sources, weights) if name in s.A]
            dtype = present[0][0].A[name].dtype
            if method in LINEAR_FAMILY:
                a, b = _combine_factors(name, present, method, density, majority_sign_method)
            elif method == "cat":
                a, b = _concatenate(name, present, new_rank)
            else:
                a, b = _combine_svd(name, present, method, new_rank, density, majority_sign_method, svd_clamp)
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    config = dict(sources[0].config)
    config.update(_output_targets(sources, order))
    # scaling 1 (alpha = r, no rsLoRA): B·A is the combined ΔW. PEFT keeps use_rslora of the first
    # adapter, which would scale an rsLoRA combination by sqrt(r) on top; the tensors are PEFT's either way.
    config.update(r=new_rank, lora_alpha=new_rank, use_rslora=False, alpha_pattern={}, rank_pattern={},
                  use_dora=False)
    _write(out, tensors, config, sources, method=method, weights=list(weights), density=density,
           majority_sign_method=majority_sign_method, svd_rank=svd_rank, seed=seed)
    return CombineResult(out, method, new_rank, len(order))


def _split_weight(weight: float, scaling: float) -> tuple[float, float]:
    """PEFT: the sign goes on A only, sqrt(|w·s|) on both sides."""
    ws = weight * scaling
    sign = 1 if ws >= 0 else -1
    return math.sqrt(abs(ws)) * sign, math.sqrt(abs(ws))


def _combine_factors(name, present, method, density, majority_sign_method) -> tuple[Tensor, Tensor]:
    wa, wb = zip(*(_split_weight(w, s.scaling[name]) for s, w in present))
    a = combine_tensors([s.A[name] for s, _ in present], torch.tensor(wa), method, density, majority_sign_method)
    b = combine_tensors([s.B[name] for s, _ in present], torch.tensor(wb), method, density, majority_sign_method)
    return a, b


def _concatenate(name, present, new_rank) -> tuple[Tensor, Tensor]:
    a_parts = [s.A[name] * w * s.scaling[name] for s, w in present]
    b_parts = [s.B[name] for s, _ in present]
    a_cat, b_cat = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
    a = torch.zeros(new_rank, a_cat.shape[1], dtype=a_cat.dtype)
    b = torch.zeros(b_cat.shape[0], new_rank, dtype=b_cat.dtype)
    a[: a_cat.shape[0]] = a_cat
    b[:, : b_cat.shape[1]] = b_cat
    return a, b


def _combine_svd(name, present, method, new_rank, density, majority_sign_method, clamp) -> tuple[Tensor, Tensor]:
    # PEFT's get_delta_weight: (B @ A) * scaling, in fp32 for half-precision adapters on the CPU
    deltas = [delta_weight(s.A[name], s.B[name], s.scaling[name]) for s, _ in present]
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = combine_tensors(deltas, weights, method, density, majority_sign_method)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, u


def _write(out: Path, tensors: dict[str, Tensor], config: dict[str, Any], sources: list[SourceAdapter],
           **provenance: Any) -> None:
    """The combined adapter's files, each written atomically (:mod:`peftlab.checkpoint.atomic`)."""
    write_adapter(out, tensors, config)
    provenance["adapters"] = [str(s.path) for s in sources]
    atomic_write_text(out / PROVENANCE_NAME, json.dumps(provenance, indent=2) + "\n")
    recipe = common_recipe([s.path / ADAPTER_RECIPE_NAME for s in sources])
    if recipe is not None:
        atomic_write(out / ADAPTER_RECIPE_NAME, lambda tmp: shutil.copy2(recipe, tmp))
    # The chat template carries over when every input was trained with the same one.
    templates = {read_chat_template(s.path) for s in sources}
    if len(templates) == 1:
        save_chat_template(out, templates.pop())


def common_recipe(recipes: list[Path]) -> Path | None:
    """The training recipe (``peftlab_recipe.yaml``) a combination carries over, or None: it tells ``peftlab merge``
    how the base was quantised, so it carries over only when every input has one and all agree on the base model,
    its dtype and its quantisation. A base named by a local directory is compared as that directory (an adapter's
    recipe names it absolute since 2026-12, relative to the working directory before), hub ids and builtins as written."""
    if not recipes or not all(p.is_file() for p in recipes):
        return None
    import yaml

    def base(raw: dict[str, Any]) -> tuple[Any, ...]:
        model = raw.get("model") or {}
        name = model.get("name")
        if isinstance(name, str) and not name.startswith("builtin:") and Path(name).expanduser().is_dir():
            name = str(Path(name).expanduser().resolve())
        return name, model.get("dtype"), raw.get("quantization")

    keys = [base(yaml.safe_load(p.read_text()) or {}) for p in recipes]
    return recipes[0] if all(k == keys[0] for k in keys) else None


# --------------------------------------------------------------------------------------------------
# the YAML form: peftlab merge --config combine.yaml


def load_combine_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a combination YAML file into :func:`combine_adapters` keyword arguments.

    ```yaml
    method: ties            # linear | ties | dare_linear | dare_ties | svd | cat | ...
    density: 0.5
    seed: 0
    adapters:
      - {path: runs/math/adapter, weight: 1.0}
      - {path: runs/chat/adapter, weight: 0.5}
    out: runs/math+chat      # optional; --out wins
    ```
    Relative paths are resolved against the YAML file's directory.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PeftlabError(f"--config {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PeftlabError(f"--config {path}: the top level must be a mapping (method, adapters, ...)")
    known = {"method", "adapters", "weights", "density", "seed", "majority_sign_method", "svd_rank",
             "svd_clamp", "base", "out"}
    unknown = sorted(set(raw) - known)
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                 for k in unknown]
        raise PeftlabError(f"--config {path}: unknown key(s) {', '.join(hints)}; known: {', '.join(sorted(known))}")
    items = raw.get("adapters")
    if not isinstance(items, list) or not items:
        raise PeftlabError(f"--config {path}: 'adapters' must be a non-empty list of paths or {{path, weight}}")
    base_dir = path.resolve().parent
    dirs, weights = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "weight"}:
            raise PeftlabError(f"--config {path}: adapters[{i}] must be a path or a mapping with path and weight")
        dirs.append(str(base_dir / Path(item["path"]).expanduser()))
        weights.append(item.get("weight"))
    if raw.get("weights") is not None:
        if any(w is not None for w in weights):
            raise PeftlabError(f"--config {path}: give weights either per adapter or as 'weights', not both")
        weights = list(raw["weights"])
    weights = [1.0 if w is None else float(w) for w in weights]
    args: dict[str, Any] = {"adapters": dirs, "weights": weights}
    for key in ("method", "density", "seed", "majority_sign_method", "svd_rank", "svd_clamp", "base"):
        if raw.get(key) is not None:
            args[key] = raw[key]
    if raw.get("out") is not None:
        args["out_dir"] = str(base_dir / Path(raw["out"]).expanduser())
    return args
