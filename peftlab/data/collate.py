"""Examples or packs -> a right-padded batch of tensors.

Packs need attention that does not cross sample boundaries. What transformers 5.x's Llama does with
our inputs (``masking_utils``):

- a 4D ``attention_mask`` is used as is (``_preprocess_mask_arguments`` returns it untouched). SDPA
  takes a bool mask (True = may attend); eager ADDS the mask to the scores, so it needs an additive
  float mask (0 / finfo.min). We build the block-diagonal causal mask in the form each one needs.
- flash-attention 2/3 read sample boundaries from ``position_ids`` restarting at 0 (varlen
  ``cu_seqlens``) when no 2D attention mask is given, so for them we pass ``position_ids`` and no
  ``attention_mask`` (a 2D padding mask would make them ignore the packing).
- anything else (flex attention, custom kernels) is refused rather than silently leaking.

Padding after a pack is given its own segment (positions restarting at 0) so no padded query row is
fully masked (SDPA would return NaN for it) and no real token ever sees it (it comes later).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftlab.data.preference_batch import preference_rows
from peftlab.data.preference_rows import is_preference_example
from peftlab.errors import PeftlabError

IGNORE_INDEX = -100
MASK_IMPLEMENTATIONS = ("sdpa", "eager")
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else (n + multiple - 1) // multiple * multiple


def collate(examples: Sequence[dict[str, Any]], *, pad_token_id: int, pad_to_multiple_of: int | None = None,
            attn_implementation: str = "sdpa") -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` (plain examples, packs, or classification examples) into one batch.

    Returns ``input_ids``, ``labels`` (-100 at padding; shape (B,) for classification),
    ``attention_mask`` (2D for plain examples; 4D block-diagonal causal for packs under sdpa/eager;
    absent for packs under flash attention), ``position_ids`` (packs), ``loss_weights`` (per token,
    like labels; (B,) for classification), ``num_tokens`` (0-dim: the batch's non-padding tokens, which
    a 4D pack mask no longer shows) and ``sample_ids`` ((B,) or (B, max samples per pack), -1
    padded).

    Mixture loss (L = sum_i lambda_i * L_i): the trainer weights each target token's cross-entropy by
    ``loss_weights`` after the usual shift, ``(ce * loss_weights[:, 1:]).sum() / n_target_tokens``,
    so a dataset's tokens count lambda_i times; padding has weight 0 and label -100.
    """
    if not examples:
        raise ValueError("collate() got an empty batch")
    if is_preference_example(examples[0]):  # pairs / KTO completions: 2B rows of one forward
        rows, extra = preference_rows(examples)
        return {**collate(rows, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                          attn_implementation=attn_implementation), **extra}
    if "label" in examples[0]:
        return _collate_classification(examples, pad_token_id, pad_to_multiple_of)
    packed = "seq_lens" in examples[0]
    if any(("seq_lens" in ex) != packed for ex in examples):
        raise ValueError("cannot mix packs and unpacked examples in one batch")
    bsz = len(examples)
    length = _round_up(max(len(ex["input_ids"]) for ex in examples), pad_to_multiple_of)
    input_ids = torch.full((bsz, length), pad_token_id, dtype=torch.long)
    labels = torch.full((bsz, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((bsz, length), dtype=torch.long)
    loss_weights = torch.zeros((bsz, length), dtype=torch.float32)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
        lw = ex.get("loss_weight", 1.0)
        loss_weights[b, :n] = torch.tensor(lw, dtype=torch.float32) if isinstance(lw, list) else float(lw)
    batch: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels, "loss_weights": loss_weights,
                                      "num_tokens": attention_mask.sum()}  # real (non-padding) tokens
    if not packed:
        batch["attention_mask"] = attention_mask
        batch["sample_ids"] = torch.tensor([ex["sample_id"] for ex in examples], dtype=torch.long)
        return batch

    # packs: one segment id per token, padding as a segment of its own
    position_ids = torch.zeros((bsz, length), dtype=torch.long)
    segments = torch.zeros((bsz, length), dtype=torch.long)
    most = max(len(ex["seq_lens"]) for ex in examples)
    sample_ids = torch.full((bsz, most), -1, dtype=torch.long)
    for b, ex in enumerate(examples):
        pos = 0
        for k, n in enumerate([*ex["seq_lens"], length - len(ex["input_ids"])]):
            if n <= 0:
                continue
            position_ids[b, pos:pos + n] = torch.arange(n)
            segments[b, pos:pos + n] = k
            pos += n
        sample_ids[b, :len(ex["sample_ids"])] = torch.tensor(ex["sample_ids"], dtype=torch.long)
    batch["position_ids"] = position_ids
    batch["sample_ids"] = sample_ids
    if attn_implementation in MASK_IMPLEMENTATIONS:
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal  # (B, q, k)
        if attn_implementation == "sdpa":
            batch["attention_mask"] = allowed[:, None]
        else:
            mask = torch.zeros((bsz, 1, length, length), dtype=torch.float32)
            batch["attention_mask"] = mask.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    elif attn_implementation in VARLEN_IMPLEMENTATIONS:
        pass  # boundaries come from position_ids
    else:
        raise PeftlabError(
            f"packing with attn_implementation={attn_implementation!r} is not supported: attention would leak "
            f"across packed samples. Use one of {[*MASK_IMPLEMENTATIONS, *VARLEN_IMPLEMENTATIONS]} or set "
            "data.packing: false"
        )
    return batch


def _collate_classification(examples: Sequence[dict[str, Any]], pad_token_id: int,
                            pad_to_multiple_of: int | None) -> dict[str, torch.Tensor]:
    bsz = len(examples)
    length = _round_up(max(len(ex["input_ids"]) for ex in examples), pad_to_multiple_of)
    input_ids = torch.full((bsz, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((bsz, length), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
    regression = isinstance(examples[0]["label"], float)
    labels = torch.tensor([ex["label"] for ex in examples], dtype=torch.float32 if regression else torch.long)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "loss_weights": torch.tensor([float(ex.get("loss_weight", 1.0)) for ex in examples]),
        "sample_ids": torch.tensor([ex["sample_id"] for ex in examples], dtype=torch.long),
    }
