"""The causal-LM loss: final hidden states + the head weight -> cross-entropy, never whole logits.

The trainer (through :class:`peftlab.objectives.objective.CausalLMObjective`) never runs the model's own
``lm_head`` in training: it asks the decoder for its final hidden states and hands them, with the head weight, to
:func:`peftlab.kernels.fused_linear_cross_entropy` (Triton on CUDA, chunked PyTorch elsewhere). The
loss is a *sum* over target tokens divided by ``normalizer`` — the number of target tokens in all
micro-batches of the optimizer step — so gradient accumulation gives exactly the gradient of the
token-mean loss over the whole step (not a mean of per-micro-batch means).

``kernels: off`` runs the model's unfused path (full logits + ``F.cross_entropy`` in fp32) with the
same normalisation; it exists for comparison and debugging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.engine.deepspeed import gathered_head
from peftlab.errors import PeftlabError
from peftlab.kernels import fused_linear_cross_entropy

IGNORE_INDEX = -100
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class LossSettings:
    backend: str = "auto"  # auto | triton | torch | off
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    model_softcaps: bool = False  # the model's own forward already soft-caps its logits (Gemma-2)

    @classmethod
    def from_recipe(cls, recipe: Any, model: nn.Module | None = None) -> LossSettings:
        """The recipe's loss settings; a model whose config soft-caps its logits (Gemma-2's
        ``final_logit_softcapping``) gets that cap in the fused loss, which never runs the model's head."""
        softcap = recipe.train.loss.softcap
        own = getattr(getattr(model, "config", None), "final_logit_softcapping", None) if model is not None else None
        if own is not None and softcap is not None and float(softcap) != float(own):
            raise PeftlabError(f"train.loss.softcap={softcap}: the model already caps its logits at {own} "
                               "(final_logit_softcapping in its config); remove train.loss.softcap")
        return cls(recipe.kernels, recipe.train.loss.label_smoothing, recipe.train.loss.z_loss,
                   softcap if softcap is not None else own, model_softcaps=own is not None)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, 1:] padded with ignore at the end: position t is trained to predict token t+1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Number of trained tokens of a batch (after the shift)."""
    return int((shifted_labels(batch["labels"]) != IGNORE_INDEX).sum())


def loss_normalizer(batch: dict[str, torch.Tensor]) -> float:
    """Σ of the loss weights of a batch's targets: what a step's summed weighted loss is divided by.

    With per-row / per-dataset weights the loss is the weighted mean Σ w·ℓ / Σ w, so a row of weight 2
    counts exactly like the same row twice (duplicating it adds its tokens to the denominator too).
    All-one weights give :func:`count_targets` exactly (the plain token mean).
    """
    weights = batch.get("loss_weights")
    if weights is None:
        return float(count_targets(batch))
    targets = shifted_labels(batch["labels"]) != IGNORE_INDEX
    shifted = F.pad(weights[:, 1:], (0, 1), value=0.0).double()
    return float((shifted * targets).sum())


def final_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H) — the model without its output head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = decoder(**model_inputs(batch), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def output_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no linear output head; the fused loss needs one")
    return head


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, normalizer: float,
                   settings: LossSettings = LossSettings()) -> torch.Tensor:
    """Σ over target tokens of (weighted) cross-entropy, divided by ``normalizer``; fp32 scalar.

    ``batch["loss_weights"]`` (per token, optional) scales each token's loss — per-dataset loss
    weights and per-sample weights; all-ones gives the plain loss.
    """
    labels = shifted_labels(batch["labels"])
    weights = batch.get("loss_weights")
    if weights is not None:
        weights = F.pad(weights[:, 1:], (0, 1), value=0.0).float()
        if bool((weights == 1).all()):
            weights = None
    if settings.backend == "off":
        logits = model(**model_inputs(batch), use_cache=False).logits.float()
        if settings.softcap and not settings.model_softcaps:  # never cap twice
            logits = settings.softcap * torch.tanh(logits / settings.softcap)
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="none", label_smoothing=settings.label_smoothing)
        if settings.z_loss:
            lse = torch.logsumexp(logits.flatten(0, 1), dim=-1)
            per_token = per_token + settings.z_loss * lse.square() * (labels.flatten() != IGNORE_INDEX)
        if weights is not None:
            per_token = per_token * weights.flatten()
        return per_token.sum() / normalizer

    hidden = final_hidden_states(model, batch)
    head = output_head(model)
    # Under DeepSpeed ZeRO-3 the head weight is partitioned across ranks: gathered here (a no-op otherwise).
    with gathered_head(head.weight, head.bias) as (head_weight, head_bias):
        kw = {"head_bias": head_bias, "ignore_index": IGNORE_INDEX, "label_smoothing": settings.label_smoothing,
                  "z_loss": settings.z_loss, "softcap": settings.softcap, "backend": settings.backend}
        if weights is None:
            return fused_linear_cross_entropy(hidden, head_weight, labels, reduction="sum", normalizer=normalizer,
                                              **kw)
        per_token = fused_linear_cross_entropy(hidden, head_weight, labels, reduction="none", **kw)
    return (per_token * weights).sum() / normalizer


@torch.no_grad()
def eval_loss(model: nn.Module, batches, *, settings: LossSettings) -> tuple[float, int]:
    """(token-mean loss, target tokens) over an iterable of batches."""
    total, n = 0.0, 0
    for batch in batches:
        k = count_targets(batch)
        if k == 0:
            continue
        total += float(causal_lm_loss(model, batch, normalizer=1.0, settings=settings))
        n += k
    return (total / n if n else float("nan")), n
