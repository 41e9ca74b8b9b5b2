"""A micro-batch of preference examples as the rows of one forward pass.

Pairs (DPO, IPO, ORPO, SimPO): ``B`` pairs become ``2B`` rows, the chosen sequences first, then the rejected
ones (``prompt + chosen_i`` for rows ``0..B-1``, ``prompt + rejected_i`` for rows ``B..2B-1``), right-padded to
one length by :func:`peftlab.data.collate.collate`, so one forward computes both (TRL's concatenated forward);
the prompt is masked (-100) in the labels.

KTO: ``B`` completions become ``2B`` rows: ``prompt_i + completion_i`` and, for KTO's KL estimate,
``prompt_i + completion_{i-1}`` (the completions shifted by one within the batch, as TRL builds its KL
dataset); a mismatched row is cut to the longest matched row, so the batch is no longer than it would be
anyway.

:func:`preference_rows` returns the rows (plain examples) and the batch keys that describe them:
``pairs`` (0-dim: ``B``), ``desirable`` ((B,) bool; KTO) and ``sample_ids`` ((B,), one per pair/completion).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def _row(prompt: list[int], ids: list[int], labels: list[int], ex: dict[str, Any],
         limit: int | None = None) -> dict[str, Any]:
    input_ids = [*prompt, *ids]
    row_labels = [IGNORE_INDEX] * len(prompt) + list(labels)
    if limit is not None:
        input_ids, row_labels = input_ids[:limit], row_labels[:limit]
    return {"input_ids": input_ids, "labels": row_labels, "loss_weight": ex.get("loss_weight", 1.0),
            "sample_id": ex["sample_id"]}


def preference_rows(examples: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """(rows for ``collate``, extra batch keys) of a micro-batch of pairs or of KTO completions."""
    extra: dict[str, torch.Tensor] = {
        "pairs": torch.tensor(len(examples)),
        "sample_ids": torch.tensor([ex["sample_id"] for ex in examples], dtype=torch.long),
    }
    if "chosen_ids" in examples[0]:
        rows = [_row(ex["prompt_ids"], ex[f"{side}_ids"], ex[f"{side}_labels"], ex)
                for side in ("chosen", "rejected") for ex in examples]
        return rows, extra
    if any("completion_ids" not in ex for ex in examples):
        raise ValueError("cannot mix preference pairs and KTO completions in one batch")
    rows = [_row(ex["prompt_ids"], ex["completion_ids"], ex["completion_labels"], ex) for ex in examples]
    longest = max(len(r["input_ids"]) for r in rows)
    n = len(examples)
    rows += [_row(ex["prompt_ids"], examples[(i - 1) % n]["completion_ids"], examples[(i - 1) % n]["completion_labels"],
                  ex, limit=longest) for i, ex in enumerate(examples)]
    extra["desirable"] = torch.tensor([bool(ex["desirable"]) for ex in examples], dtype=torch.bool)
    return rows, extra
