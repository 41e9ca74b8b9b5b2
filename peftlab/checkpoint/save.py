"""What a checkpoint of a training run holds, and writing one at a step boundary (every rank takes part).

One checkpoint, ``<output.dir>/<checkpoint.dir>/step-0000040/`` (written by :mod:`peftlab.checkpoint.store`)::

    adapter/adapter_model.safetensors   LoRA weights, PEFT format (gathered from every rank under ZeRO-3)
    adapter/adapter_config.json         PEFT LoraConfig
    adapter/peftlab_recipe.yaml         the resolved recipe (the adapter directory is usable on its own)
    trainable_modules.safetensors       every other trainable parameter (a classification head, a DANN domain
                       head, unfrozen modules), by its name in the model; the local engine only (DeepSpeed's
                       own checkpoint holds them); absent when there are none
    engine.pt          the engine's state one rank holds: optimizer + scheduler (+ gradient scaler) for the
                       local engine, bookkeeping under DeepSpeed; torch.save, read weights_only
    rng.pt             every RNG state (:mod:`peftlab.checkpoint.rng`); read weights_only
    trainer_state.json step, epoch, sampler position, counters, guard history, data fingerprint
    recipe.yaml        the recipe of the run, as given (resume compares it with the current one)
    deepspeed/         under DeepSpeed only: its own sharded checkpoint and ``latest`` (the engine's part)
    COMPLETE           written last: {file: size, sha256} of every file above

Resuming from it: :mod:`peftlab.checkpoint.resume`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save as safetensors_bytes
from torch import nn

from peftlab.adapters.peft_format import lora_parameters
from peftlab.checkpoint.rng import capture_rng
from peftlab.checkpoint.store import adapter_files, checkpoint_name, torch_bytes, write_checkpoint
from peftlab.engine.interface import Engine
from peftlab.engine.process_group import all_reduce_sum, is_main_process
from peftlab.errors import PeftlabError
from peftlab.recipe.from_adapter import ADAPTER_RECIPE_NAME

TRAINABLE_FILE = "trainable_modules.safetensors"


def trainable_modules(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable parameter outside the LoRA adapter (a classification head, a domain head, unfrozen base
    modules), by its name in the model: the adapter file does not hold them, and a resume without them would
    continue from their initial values while the optimizer's moments are the trained ones."""
    lora = {id(p) for p in lora_parameters(model).values()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora}


def trainable_module_files(model: nn.Module) -> dict[str, bytes]:
    """``{TRAINABLE_FILE: safetensors bytes}`` of :func:`trainable_modules`, or nothing when there are none."""
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in trainable_modules(model).items()}
    return {TRAINABLE_FILE: safetensors_bytes(tensors, metadata={"format": "pt"})} if tensors else {}


def restore_trainable_modules(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path, *,
                              check_only: bool = False) -> None:
    """Copy a checkpoint's :data:`TRAINABLE_FILE` tensors into the model; PeftlabError (nothing copied) when
    names or shapes differ. ``check_only``: the check alone (a resume refuses before it changes anything)."""
    params = trainable_modules(model)
    bad = sorted(params.keys() ^ tensors.keys()) + sorted(
        k for k in params.keys() & tensors.keys() if tuple(params[k].shape) != tuple(tensors[k].shape))
    if bad:
        raise PeftlabError(f"resume: the trainable modules in {where} do not fit this model (keys missing, "
                           f"unexpected or of another shape: {', '.join(bad[:4])}); resume with the recipe that "
                           "wrote the checkpoint, or start a fresh run")
    if check_only:
        return
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))


def run_files(*, resolved_recipe: dict[str, Any], recipe: dict[str, Any], engine_state: dict[str, Any],
              trainer_state: dict[str, Any]) -> dict[str, bytes]:
    """Everything of a checkpoint but the adapter weights and the engine's own part (rank 0's view); the RNG
    states are captured now."""
    return {
        f"adapter/{ADAPTER_RECIPE_NAME}": yaml.safe_dump(resolved_recipe, sort_keys=False).encode(),
        "engine.pt": torch_bytes(engine_state),
        "rng.pt": torch_bytes(capture_rng()),
        "trainer_state.json": (json.dumps(trainer_state, indent=1) + "\n").encode(),
        "recipe.yaml": yaml.safe_dump(recipe, sort_keys=False).encode(),
    }


def save_checkpoint(root: Path, step: int, *, model: nn.Module, engine: Engine, base_model_name_or_path: str,
                    files: Callable[[], dict[str, bytes]], keep_last: int | None) -> Path:
    """Write the checkpoint of ``step`` under ``root``; called on every rank.

    Every rank gives the whole adapter (gathered under ZeRO-3; checked non-empty) and the engine's part (every
    DeepSpeed rank writes its shard into ``.ds-staging-step-N`` first); rank 0 adds ``files()`` (see
    :func:`run_files`) and writes the atomic checkpoint, then tells the other ranks whether it succeeded.
    """
    name = checkpoint_name(step)
    tensors = engine.adapter_state(f"checkpoint {name}")
    path = root / name
    error: PeftlabError | None = None
    with engine.checkpoint_part(root / f".ds-staging-{name}") as part:
        if is_main_process():
            try:
                everything = adapter_files(model, base_model_name_or_path, tensors=tensors)
                everything.update(files())
                everything.update(part)
                if not part:  # DeepSpeed's own part already holds every trainable module's weights
                    everything.update(trainable_module_files(model))
                path = write_checkpoint(root, step, everything, keep_last=keep_last)
            except PeftlabError as exc:
                error = exc
    failed = all_reduce_sum(1 if error is not None else 0)  # also the closing barrier
    if error is not None:
        raise error
    if failed:
        raise PeftlabError(f"rank 0 could not write checkpoint {name} into {root} (see its error)")
    return path
