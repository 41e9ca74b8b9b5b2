"""The engine interface: what the training loop asks of whatever runs its optimizer steps.

Two engines implement it — :class:`peftlab.engine.local.LocalEngine` (plain PyTorch, one process) and
:class:`peftlab.engine.deepspeed.ZeroEngine` (DeepSpeed ZeRO 0-3 across processes) — so the loop and the
checkpoint code never ask which one they hold:

- the step: ``backward(loss)`` per micro-batch, ``step(skip=...)`` per optimizer step, ``lr``;
- its state in a checkpoint: ``state_dict()`` / ``load_state_dict()`` (the part one rank can hold, saved as
  ``engine.pt``), ``checkpoint_part(staging)`` (the files of the engine's own sharded checkpoint, written
  by every rank: DeepSpeed's ``deepspeed/`` with its ``latest``; nothing for the local engine) and
  ``restore(path, weights, state)`` (everything a resume puts back into the engine and the model);
- the adapter: ``adapter_state(where)`` (the whole LoRA tensors on every rank: gathered from the ZeRO-3
  partitions) and ``save_adapter(path, base_model_name_or_path=...)`` (written once, by rank 0).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool  # a non-finite gradient (or the caller's skip): the update was not applied


@runtime_checkable
class Engine(Protocol):
    """What runs the optimizer steps of a training run (see the module docstring)."""

    model: nn.Module

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group for the next step."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss (already divided by the step's normaliser)."""
        ...

    def step(self, *, skip: bool = False) -> StepResult:
        """Apply the accumulated gradients (unless ``skip`` or they are not finite), advance the schedule."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What rank 0 saves of the engine as ``engine.pt`` (tensors and plain containers only)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    def checkpoint_part(self, staging: Path) -> AbstractContextManager[dict[str, bytes]]:
        """Called on every rank: the engine's own files of a checkpoint as {relative name: bytes} (rank 0's
        view; ``staging`` is a scratch directory under the checkpoint root, removed when the block ends)."""
        ...

    def restore(self, path: Path, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Put the checkpoint at ``path`` back: adapter ``weights`` (PEFT names) and engine ``state``; refuses a
        checkpoint another kind of engine wrote."""
        ...

    def adapter_state(self, where: str) -> dict[str, torch.Tensor]:
        """The LoRA weights (PEFT key names), whole, on every rank; ``where`` names the file in errors."""
        ...

    def save_adapter(self, path: Path, *, base_model_name_or_path: str) -> None:
        """Write the adapter in the PEFT format (every rank calls it; rank 0 writes)."""
        ...

    def close(self) -> None:
        """The run is over (finished or failed): undo what the engine changed process-wide. Idempotent."""
        ...
