"""The reference model of preference training: the policy itself with its adapters switched off.

A LoRA run's frozen base *is* the reference DPO/IPO/KTO compare against, so no second model is loaded:
:func:`adapters_disabled` makes every :class:`~peftlab.adapters.lora_layer.LoraLinear` of the model compute its
base layer only (``kernel_backend = "off"``, set on the module instances and restored after; whole-block fused
forwards honour it too), or enters PEFT's ``disable_adapter()`` for a PEFT model. Under DeepSpeed ZeRO-3 the
base layers are submodules with their own gather hooks, so the adapters-off forward gathers what it reads.

:func:`sequence_logps` is the per-sequence log-prob of the labelled tokens through the chunked fused-linear
path (:func:`peftlab.kernels.fused_linear_logprobs.fused_linear_sequence_logprobs`): never batch × seq × vocab
logits. :class:`ReferenceCache` holds reference log-probs computed once (``preference.reference:
precomputed``) from the model as training starts, keyed by the examples' sample ids.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.adapters.lora_inject import lora_modules
from peftlab.checkpoint.atomic import atomic_write_text
from peftlab.engine.deepspeed import gathered_head
from peftlab.kernels.fused_linear_logprobs import fused_linear_sequence_logprobs
from peftlab.objectives.causal_lm import (
    IGNORE_INDEX,
    LossSettings,
    final_hidden_states,
    output_head,
    shifted_labels,
)

Batch = dict[str, torch.Tensor]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model computing without its adapters (the frozen base) inside the block; restored after, also on
    an exception."""
    if hasattr(model, "disable_adapter") and not lora_modules(model):  # a PEFT model
        with model.disable_adapter():
            yield model
        return
    layers = list(lora_modules(model).values())
    saved = [m.kernel_backend for m in layers]
    try:
        for m in layers:
            m.kernel_backend = "off"
        yield model
    finally:
        for m, backend in zip(layers, saved):
            m.kernel_backend = backend


def sequence_logps(model: nn.Module, batch: Batch, settings: LossSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p of each row's labelled tokens (rows,) fp32, labelled tokens per row (rows,)); labels are
    shifted here (position t scores token t+1), the prompt and padding are -100."""
    labels = shifted_labels(batch["labels"])
    hidden = final_hidden_states(model, batch)
    head = output_head(model)
    # Under DeepSpeed ZeRO-3 the head weight is partitioned across ranks: gathered here (a no-op otherwise).
    with gathered_head(head.weight, head.bias) as (weight, bias):
        backend = "torch" if settings.backend == "off" else settings.backend
        return fused_linear_sequence_logprobs(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX,
                                              softcap=settings.softcap, backend=backend)


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of a batch's per-row tensors (the model inputs and labels)."""
    return {k: batch[k][start:stop] for k in ("input_ids", "attention_mask", "labels", "position_ids")
            if k in batch}


@torch.no_grad()
def reference_logps(model: nn.Module, batch: Batch, settings: LossSettings) -> torch.Tensor:
    """Per-row reference log-probs: the same forward with the adapters off, without a graph."""
    with adapters_disabled(model):
        return sequence_logps(model, batch, settings)[0]


class ReferenceCache:
    """Reference log-probs computed once for every training pair (``preference.reference: precomputed``), by
    sample id: ``{sample_id: (chosen, rejected)}``, from the model as training starts (the base, or the base +
    ``adapter.init_from``). Computed in a fixed order of fixed micro-batches and kept in a JSON file under
    ``key`` (what they were computed from), written atomically; a resumed run reads it back (its adapters have
    moved on, so recomputing would give other numbers)."""

    def __init__(self, key: str = "") -> None:
        self.key = key
        self.values: dict[int, tuple[float, float]] = {}

    def fill(self, model: nn.Module, n_examples: int, batch_size: int, build_batch: Any,
             settings: LossSettings) -> None:
        was_training = model.training
        model.eval()
        try:
            for start in range(0, n_examples, batch_size):
                batch = build_batch(list(range(start, min(n_examples, start + batch_size))))
                pairs = int(batch["pairs"])
                with torch.no_grad():
                    logps = sequence_logps(model, batch, settings)[0].double().cpu()
                for k, sid in enumerate(batch["sample_ids"].tolist()):
                    self.values[int(sid)] = (float(logps[k]), float(logps[pairs + k]))
        finally:
            model.train(was_training)

    def save(self, path: Path) -> None:
        data = {"key": self.key, "values": {str(k): list(v) for k, v in self.values.items()}}
        atomic_write_text(path, json.dumps(data))

    @classmethod
    def read(cls, path: Path, key: str) -> ReferenceCache | None:
        """The cache in ``path`` when it was computed under ``key`` (None when absent, unreadable or other)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("values"), dict):
            return None
        cache = cls(key)
        cache.values = {int(k): (float(v[0]), float(v[1])) for k, v in data["values"].items()}
        return cache

    def lookup(self, batch: Batch) -> torch.Tensor:
        """(2B,) reference log-probs of a batch's rows: the chosen ones, then the rejected ones."""
        pairs = [self.values[int(s)] for s in batch["sample_ids"].tolist()]
        device = batch["input_ids"].device
        return torch.tensor([p[0] for p in pairs] + [p[1] for p in pairs], dtype=torch.float32, device=device)

    def __len__(self) -> int:
        return len(self.values)


def completion_tokens(batch: Batch) -> torch.Tensor:
    """Labelled (answer) tokens per row, after the shift."""
    return (shifted_labels(batch["labels"]) != IGNORE_INDEX).sum(dim=1)


def pairs_fingerprint(examples: Any) -> str:
    """Content hash of preference examples (their ids, in order): what precomputed log-probs were computed on."""
    h = hashlib.sha256(str(len(examples)).encode())
    for ex in examples:
        for key in ("sample_id", "prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
            if key in ex:
                h.update(repr(ex[key]).encode())
    return h.hexdigest()[:16]
