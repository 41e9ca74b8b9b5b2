"""Sequence classification and regression: the loss and metrics of a LoRA backbone with a head.

``task: classification`` (or ``regression``) with ``classification``-format data ({text, label}); the model —
backbone + LoRA + head on a pooled hidden state — is :mod:`peftlab.model.classifier`. Here:

- loss: cross-entropy (classification) or squared error (regression) per row, weighted by the row's
  sample weight and divided by the summed weights of the step (as for language modelling);
- eval: accuracy, macro precision / recall, macro and micro F1 and the confusion matrix (rows = true
  class, columns = predicted, classes in label-map order; macro averages run over every class of the
  label map) — or MSE / MAE / R² for regression;
- :class:`ClassificationObjective`, the trainer's objective for these tasks (its extra files: the head).

``peftlab predict`` / ``peftlab eval DIR`` on a saved adapter: :mod:`peftlab.evaluation.predict`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.model.classifier import head_of, save_head
from peftlab.objectives.causal_lm import final_hidden_states


def pooled_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, H): the last real token's hidden state (decoders, right padding) or the first token's (encoders)."""
    head = head_of(model)
    if head.pooling == "first":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state[:, 0]
    hidden = final_hidden_states(model, {k: batch[k] for k in ("input_ids", "attention_mask")})
    last = batch["attention_mask"].sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding input tokens of a classification batch (its 2D attention mask; every token without one)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return head_of(model)(pooled_hidden(model, batch))


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    if task == "regression":
        return (logits.squeeze(-1) - labels.float()).square()
    return F.cross_entropy(logits, labels, reduction="none")


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, normalizer: float) -> torch.Tensor:
    """Σ over rows of weight x (cross-entropy | squared error), divided by ``normalizer`` (the step's
    summed row weights), for ``task: classification | regression``."""
    losses = per_row_loss(logits_of(model, batch), batch["labels"], head_of(model).task)
    weights = batch.get("loss_weights")
    if weights is not None:
        losses = losses * weights.to(losses.dtype)
    return losses.sum() / normalizer


# ---- metrics -------------------------------------------------------------------------------------


def classification_metrics(y_true: list[int], y_pred: list[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, micro F1 and the confusion matrix over classes 0..K-1.

    Same definitions as scikit-learn with ``labels=range(K)`` and ``zero_division=0`` (a class never
    predicted has precision 0; never present, recall 0)."""
    cm = torch.zeros((num_labels, num_labels), dtype=torch.long)
    for t, p in zip(y_true, y_pred):
        cm[t, p] += 1
    tp = cm.diag().double()
    pred_n, true_n = cm.sum(0).double(), cm.sum(1).double()
    precision = torch.where(pred_n > 0, tp / pred_n.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(true_n > 0, tp / true_n.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    n = max(1, len(y_true))
    accuracy = float(tp.sum()) / n
    return {"accuracy": accuracy, "precision": float(precision.mean()), "recall": float(recall.mean()),
            "f1_macro": float(f1.mean()), "f1_micro": accuracy,  # single-label: micro P = R = F1 = accuracy
            "confusion_matrix": cm.tolist()}


def regression_metrics(y_true: list[float], y_pred: list[float]) -> dict[str, Any]:
    t = torch.tensor(y_true, dtype=torch.float64)
    p = torch.tensor(y_pred, dtype=torch.float64)
    mse = float((p - t).square().mean())
    var = float((t - t.mean()).square().sum())
    r2 = 1.0 - float((p - t).square().sum()) / var if var > 0 else float("nan")
    return {"mse": mse, "mae": float((p - t).abs().mean()), "r2": r2}


@torch.no_grad()
def predict_batches(model: nn.Module, batches) -> tuple[torch.Tensor, list[Any]]:
    """(logits of every row, labels when the batches carry them)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    try:
        for b in batches:
            outs.append(logits_of(model, b).cpu())
            if "labels" in b:
                labels += b["labels"].tolist()
    finally:
        model.train(was_training)
    return torch.cat(outs), labels


def evaluate_classifier(model: nn.Module, batches, *, task: str, label_map: dict[str, int] | None) -> dict[str, Any]:
    """Eval metrics of a classification/regression run (empty without eval data)."""
    if not batches:
        return {}
    logits, labels = predict_batches(model, batches)
    y = torch.tensor(labels, dtype=torch.float32 if task == "regression" else torch.long)
    loss = float(per_row_loss(logits, y, task).mean())
    if task == "regression":
        metrics = regression_metrics(labels, logits.squeeze(-1).tolist())
    else:
        metrics = classification_metrics(labels, logits.argmax(-1).tolist(), len(label_map or {}))
    return {"eval_loss": loss, **metrics, "eval_samples": len(labels)}


# ---- the objective -------------------------------------------------------------------------------


@dataclass
class ClassificationObjective:
    """The trainer's objective for ``task: classification | regression`` (one target per row)."""

    task: str                              # "classification" | "regression"
    label_map: dict[str, int] | None = None

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], *, normalizer: float) -> torch.Tensor:
        return classification_loss(model, batch, normalizer=normalizer)

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def trained_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """The rows' input tokens, padding left out (the run's ``tokens_seen``): the targets are rows, but every
        real token of a row feeds the pooled state the loss trains on."""
        return input_tokens(batch)

    def normalizer(self, batch: dict[str, torch.Tensor]) -> float:
        """Σ of the rows' loss weights (the row count when there are none)."""
        weights = batch.get("loss_weights")
        return float(self.targets(batch)) if weights is None else float(weights.double().sum())

    def evaluate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]] | None) -> dict[str, Any]:
        return evaluate_classifier(model, batches, task=self.task, label_map=self.label_map)

    def save(self, model: nn.Module, adapter_dir: Path) -> None:
        """The head's weights and config beside the LoRA adapter (``peftlab predict`` reloads both)."""
        save_head(model, adapter_dir)

    def prepare(self, model: nn.Module, train_batches: Any) -> None:
        """Nothing to precompute."""

    def begin_step(self, step: int, total_steps: int) -> None:
        """No schedule."""
