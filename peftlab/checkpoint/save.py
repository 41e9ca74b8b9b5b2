"""What a checkpoint of a training run holds, and writing one at a step boundary (every rank takes part).

One checkpoint, ``<output.dir>/<checkpoint.dir>/step-0000040/`` (written by :mod:`peftlab.checkpoint.store`)::

    adapter/adapter_model.safetensors   LoRA weights, PEFT format (gathered from every rank under ZeRO-3)
    adapter/adapter_config.json         PEFT LoraConfig
    adapter/peftlab_recipe.yaml         the resolved recipe (the adapter directory is usable on its own)
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

import yaml
from torch import nn

from peftlab.checkpoint.rng import capture_rng
from peftlab.checkpoint.store import adapter_files, checkpoint_name, torch_bytes, write_checkpoint
from peftlab.engine.interface import Engine
from peftlab.engine.process_group import all_reduce_sum, is_main_process
from peftlab.errors import PeftlabError


def run_files(*, resolved_recipe: dict[str, Any], recipe: dict[str, Any], engine_state: dict[str, Any],
              trainer_state: dict[str, Any]) -> dict[str, bytes]:
    """Everything of a checkpoint but the adapter weights and the engine's own part (rank 0's view); the RNG
    states are captured now."""
    return {
        "adapter/peftlab_recipe.yaml": yaml.safe_dump(resolved_recipe, sort_keys=False).encode(),
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
                path = write_checkpoint(root, step, everything, keep_last=keep_last)
            except PeftlabError as exc:
                error = exc
    failed = all_reduce_sum(1 if error is not None else 0)  # also the closing barrier
    if error is not None:
        raise error
    if failed:
        raise PeftlabError(f"rank 0 could not write checkpoint {name} into {root} (see its error)")
    return path
