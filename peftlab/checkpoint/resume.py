"""Resuming a training run: which checkpoint, whether it may be continued, and putting it back.

``resume: auto`` takes the newest complete checkpoint (damaged or interrupted ones are named and skipped; when
every completed one is damaged the run refuses instead of silently starting over), ``resume: PATH`` exactly that
one. A resume is refused — before anything is changed — when the recipe differs in a key that decides what the
run computes (model, quantization, adapter, data, batch geometry, seed, optimizer) or when the tokenized training
data differ; other changed keys (lr, max_steps, ...) are named and applied from the next step on. Then the engine
puts back the adapter weights and its state (:meth:`peftlab.engine.interface.Engine.restore`), and the caller
gets the loop position and the RNG states to restore right before the first step
(:func:`peftlab.checkpoint.rng.restore_rng`).

What a checkpoint holds: :mod:`peftlab.checkpoint.save`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from peftlab.adapters.peft_format import lora_parameters
from peftlab.checkpoint.save import TRAINABLE_FILE, restore_trainable_modules, trainable_modules
from peftlab.checkpoint.store import MARKER, checkpoint_step, load_torch_file, scan, verify
from peftlab.engine.interface import Engine
from peftlab.errors import PeftlabError

logger = logging.getLogger(__name__)

# Keys whose change makes a resumed run differ from the run that wrote the checkpoint: refused.
# (A section name refuses every key inside it.)
RESUME_LOCKED_KEYS = (
    "model.name", "model.revision", "model.dtype", "model.tokenizer",
    "quantization", "adapter", "data", "distill", "task", "dann",
    "train.micro_batch_size", "train.grad_accum", "train.seed", "train.optimizer",
)
# Keys that may change between runs without comment (where files go, how often to log/save/evaluate).
_RESUME_SILENT_PREFIXES = ("resume", "output.", "checkpoint.", "eval.", "train.log_every", "train.eval_every",
                           "train.save_every", "train.eval_at_start")


def checkpoint_to_resume(recipe: Any, root: Path) -> Path | None:
    """The checkpoint ``resume:`` points at: the newest complete one under ``root`` (auto), a given one, or none."""
    if recipe.resume is None:
        return None
    if recipe.resume == "auto":
        found = find_resume_checkpoint(root)
        if found is None:
            logger.info(f"peftlab: resume: auto — no complete checkpoint in {root}; starting at step 0")
        return found
    return recipe.resolve_path(recipe.resume)


def find_resume_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``resume: auto``); newer ones that are not usable are
    named in a warning and skipped.

    None when there is nothing to resume from: no checkpoint, or only saves interrupted before their
    ``COMPLETE`` marker (a crash during the first save; starting at step 0 loses nothing). When every
    checkpoint that WAS completed is now damaged, PeftlabError naming each one and why: starting over
    would silently throw that training away, so the user chooses.
    """
    complete, broken = scan(root)
    if not complete and any((path / MARKER).is_file() for path, _ in broken):
        listing = "\n  ".join(f"{path}: {reason}" for path, reason in broken)
        raise PeftlabError(
            f"resume: auto found no usable checkpoint in {root}; every checkpoint there is damaged or "
            f"incomplete:\n  {listing}\nNothing was changed or deleted. Either resume from a checkpoint you "
            "trust (resume: PATH, e.g. a copy restored from a backup), or start over with resume: null and "
            "output.overwrite: true (that deletes these checkpoints and the run's metrics.jsonl)"
        )
    newest = complete[-1][1] if complete else -1
    for path, reason in broken:
        step = checkpoint_step(path) or 0
        if step > newest:
            logger.warning(f"skipping checkpoint {path}: {reason}")
    return complete[-1][0] if complete else None


@dataclass
class LoadedCheckpoint:
    path: Path
    trainer_state: dict[str, Any]
    engine_state: dict[str, Any]
    rng: dict[str, Any]
    adapter_weights: dict[str, torch.Tensor]
    recipe: dict[str, Any]


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Verify and read a checkpoint directory (PeftlabError when it is incomplete, corrupt or unsafe)."""
    path = Path(path)
    if not path.is_dir():
        raise PeftlabError(f"resume: checkpoint {path} does not exist; pass a step-NNNNNNN directory under "
                           "<output.dir>/checkpoints, or resume: auto")
    reason = verify(path)
    if reason is not None:
        raise PeftlabError(f"resume: {path} is not a usable checkpoint: {reason}. Resume from an earlier "
                           "checkpoint (resume: PATH) or use resume: auto, which picks the newest complete one")
    weights_file = path / "adapter" / "adapter_model.safetensors"
    try:
        weights = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types
        raise PeftlabError(f"resume: cannot read {weights_file}: {exc}") from None
    try:
        recipe = yaml.safe_load((path / "recipe.yaml").read_text())
        state = json.loads((path / "trainer_state.json").read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftlabError(f"resume: {path} holds an unreadable recipe.yaml / trainer_state.json ({exc})") from None
    return LoadedCheckpoint(path, state, load_torch_file(path / "engine.pt"), load_torch_file(path / "rng.pt"),
                            weights, recipe)


def _read_trainable_modules(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / TRAINABLE_FILE))
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types
        raise PeftlabError(f"resume: cannot read {path / TRAINABLE_FILE}: {exc}") from None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: d}
    return {prefix[:-1]: d}


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, other) differing keys between a checkpoint's recipe and the current one, as
    ``key: saved -> current`` lines. Refused keys change what resuming would compute."""
    a, b = _flatten(saved), _flatten(current)
    refused, other = [], []
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key, "(unset)"), b.get(key, "(unset)")
        if va == vb:
            continue
        line = f"{key}: {va!r} -> {vb!r}"
        if any(key == k or key.startswith(k + ".") for k in RESUME_LOCKED_KEYS):
            refused.append(line)
        elif not any(key == p or key.startswith(p) for p in _RESUME_SILENT_PREFIXES):
            other.append(line)
    return refused, other


@dataclass
class Resumed:
    """What the loop continues from: the checkpoint, its trainer state (position, counters) and RNG states."""

    path: Path
    trainer_state: dict[str, Any]
    rng: dict[str, Any]


def resume(path: Path, *, recipe: Any, model: nn.Module, engine: Engine, data_fingerprint: str,
           n_train: int) -> Resumed:
    """Check that the run may continue from ``path`` and restore adapter weights and engine state (every rank).

    Under DeepSpeed (the checkpoint holds ``deepspeed/``) every rank loads DeepSpeed's own checkpoint instead of
    the gathered adapter: weights, optimizer partitions and scheduler come from it. Refusals (see the module
    docstring) happen before anything is changed.
    """
    loaded = load_checkpoint(path)
    refused, changed = recipe_differences(loaded.recipe, recipe.to_dict())
    if refused:
        raise PeftlabError(
            f"resume: the recipe differs from the one that wrote {path} in settings that would make the "
            "resumed run wrong:\n  " + "\n  ".join(refused) + "\nRestore those values, or start a fresh "
            "run (another output.dir, or no resume key)"
        )
    saved = loaded.trainer_state
    if saved.get("data_fingerprint") != data_fingerprint:
        raise PeftlabError(
            f"resume: the tokenized training data differ from those the checkpoint {path} was trained on "
            f"({saved.get('n_train') or 'streamed'} rows then, {n_train or 'streamed'} now; fingerprint "
            f"{saved.get('data_fingerprint')} then, {data_fingerprint} now). Restore the files of "
            "data.train, or start a fresh run"
        )
    if changed:
        logger.warning(f"resuming from {path} with changed settings (they apply from the next step on): "
                       + "; ".join(changed))
    weights = loaded.adapter_weights
    # (ZeRO-3 parameters are empty partitions here; ds_shape is their whole shape)
    shapes = {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in lora_parameters(model).items()}
    bad = sorted(shapes.keys() ^ weights.keys()) + sorted(
        k for k in shapes.keys() & weights.keys() if shapes[k] != tuple(weights[k].shape))
    if bad:
        raise PeftlabError(f"resume: the adapter weights in {path} do not fit this model (keys missing, "
                           f"unexpected or of another shape: {', '.join(bad[:4])})")
    extra = None
    if not (path / "deepspeed").is_dir():  # under DeepSpeed its own checkpoint restores them
        extra = _read_trainable_modules(path) if (path / TRAINABLE_FILE).is_file() else {}
        if not extra and trainable_modules(model):
            raise PeftlabError(
                f"resume: {path} holds no {TRAINABLE_FILE}, but this run trains modules besides the LoRA adapter "
                f"({', '.join(list(trainable_modules(model))[:3])}): they would restart from their initial "
                "values. Resume from a checkpoint written by this peftlab, or start a fresh run")
        if extra:
            restore_trainable_modules(model, extra, path, check_only=True)
    engine.restore(path, weights, loaded.engine_state)
    if extra:
        restore_trainable_modules(model, extra, path)
    return Resumed(path, saved, loaded.rng)
