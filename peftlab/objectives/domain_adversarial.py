"""Domain-adversarial training (DANN, Ganin & Lempitsky 2015) of a classification or regression run (``dann:``).

Per training micro-batch of B source rows the objective draws B target-domain rows (:meth:`target_rows`: seeded
by the run's seed, the step and the source rows, so a resumed run draws the same ones) and runs ONE forward over
the 2B rows. On the pooled features (the hidden state the classification head reads):

- the task head sees the source rows only: ℓ_task (cross-entropy / squared error) per source row;
- the domain head (:mod:`peftlab.model.domain_head`) sees every row through the gradient-reversal layer
  (:class:`GradientReversal`: identity forward, -λ x gradient backward) and is trained on domain labels only
  (0 = source, 1 = target) — no task label, source or target, reaches it; target rows carry none at all
  (:mod:`peftlab.data.target_domain`);
- loss of the micro-batch = (Σ_i w_i·ℓ_task,i + ½ Σ_i w_i·(ℓ_dom(src_i) + ℓ_dom(tgt_i))) / normalizer, with w_i
  the source row's loss weight and tgt_i the target row paired with it; the normalizer is Σ w over every
  micro-batch of the step (as for classification), so gradient accumulation gives exactly the gradient of the
  step's weighted mean — the domain term is the weighted mean of the pair's two domain losses.

λ follows ``dann.schedule``: ``dann`` = lambda_max x (2 / (1 + exp(-10 p)) - 1) with p = step / total steps
(:meth:`begin_step`), or ``constant`` = lambda_max. The domain head itself always learns at full strength: the
reversal only scales what flows back into the backbone.

Eval metrics: the source ones of :func:`peftlab.objectives.classification.evaluate_classifier`, the same on the
labelled target rows as ``target_*`` (``target_accuracy``, ``target_f1_macro``, ...; only when target labels
exist), ``domain_accuracy`` (the domain head on source eval rows vs target rows; near 0.5 = aligned features),
``dann_lambda``. Train log records (``step_metrics``) add ``dann_lambda`` and ``domain_accuracy`` (the domain head on
the training micro-batches' source and target rows since the previous train record).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data.collate import collate
from peftlab.data.target_domain import TargetData, build_target_data
from peftlab.model.classifier import head_of, save_head
from peftlab.model.domain_head import attach_domain_head, domain_head_of, save_domain_head
from peftlab.objectives.classification import evaluate_classifier, input_tokens, per_row_loss, pooled_hidden

Batch = dict[str, torch.Tensor]


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; the gradient times -λ in the backward pass (λ is not learned)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = float(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    return GradientReversal.apply(x, lam)


def dann_lambda(step: int, total_steps: int, *, schedule: str, lambda_max: float) -> float:
    """λ at optimizer step ``step`` (1-based) of ``total_steps``: the DANN ramp or a constant."""
    if schedule == "constant":
        return float(lambda_max)
    p = min(1.0, max(0.0, step / max(1, total_steps)))
    return float(lambda_max) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


def token_batch(rows: list[dict[str, Any]], pad_token_id: int, device: torch.device) -> Batch:
    """input_ids / attention_mask of token-only rows (right-padded): nothing else of a row travels."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"], dtype=torch.long)
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _pad_join(a: Batch, b: Batch, pad_token_id: int) -> Batch:
    """input_ids / attention_mask of the rows of ``a`` then ``b``, right-padded to one length."""
    n = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, n - t.shape[1]), value=value)

    return {"input_ids": torch.cat([padded(a["input_ids"], pad_token_id), padded(b["input_ids"], pad_token_id)]),
            "attention_mask": torch.cat([padded(a["attention_mask"], 0), padded(b["attention_mask"], 0)])}


@dataclass
class DomainAdversarialObjective:
    """The trainer's objective for a ``dann:`` run (see the module docstring)."""

    task: str                                   # "classification" | "regression"
    label_map: dict[str, int] | None
    target: TargetData
    pad_token_id: int
    seed: int
    schedule: str = "dann"
    lambda_max: float = 1.0
    lam: float = 0.0                            # λ of the current step (begin_step)
    step: int = 0
    _seen: list[int] = field(default_factory=lambda: [0, 0])   # train domain predictions since the last record

    # ---- the step -------------------------------------------------------------------------------
    def begin_step(self, step: int, total_steps: int) -> None:
        self.step = step
        self.lam = dann_lambda(step, total_steps, schedule=self.schedule, lambda_max=self.lambda_max)

    def targets(self, batch: Batch) -> int:
        return int(batch["labels"].numel())     # source rows

    def trained_tokens(self, batch: Batch) -> int:
        """Input tokens of the source rows and of the target rows paired with them, padding left out (the run's
        ``tokens_seen``): the target rows train the backbone too, through the reversed domain gradient. Called
        after the step's loss, with the same step number: the pairing drawn is the one the loss used."""
        return input_tokens(batch) + sum(len(self.target.train[i]["input_ids"]) for i in self.target_rows(batch))

    def normalizer(self, batch: Batch) -> float:
        """Σ of the source rows' loss weights (the row count when there are none); target rows pair with them."""
        weights = batch.get("loss_weights")
        return float(self.targets(batch)) if weights is None else float(weights.double().sum())

    def target_rows(self, batch: Batch) -> list[int]:
        """Indices of the target rows paired with this micro-batch's source rows: a seeded draw keyed by the run's
        seed, the step and the source rows' ids (the same after a resume; different at every step)."""
        ids = batch["sample_ids"].tolist()
        key = f"dann:{self.seed}:{self.step}:{','.join(map(str, ids))}".encode()
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))
        n = len(self.target.train)
        draw = torch.randperm(n, generator=g)[:len(ids)] if n >= len(ids) else torch.randint(n, (len(ids),),
                                                                                              generator=g)
        return draw.tolist()

    def target_batch(self, batch: Batch) -> Batch:
        """The paired target rows' token ids and mask (target training rows hold no label to carry)."""
        rows = [self.target.train[i] for i in self.target_rows(batch)]
        return token_batch(rows, self.pad_token_id, batch["input_ids"].device)

    def loss(self, model: nn.Module, batch: Batch, *, normalizer: float) -> torch.Tensor:
        """(Σ w·ℓ_task + ½ Σ w·(ℓ_dom(src) + ℓ_dom(tgt))) / normalizer over this micro-batch (module docstring)."""
        n = batch["input_ids"].shape[0]
        pooled = pooled_hidden(model, _pad_join(batch, self.target_batch(batch), self.pad_token_id))
        task_loss = per_row_loss(head_of(model)(pooled[:n]), batch["labels"], self.task)
        domain_logits = domain_head_of(model)(reverse_gradient(pooled, self.lam))
        domain_labels = torch.cat([torch.zeros(n), torch.ones(n)]).to(domain_logits.device)
        domain_loss = F.binary_cross_entropy_with_logits(domain_logits, domain_labels, reduction="none")
        w = batch.get("loss_weights")
        w = torch.ones(n, device=task_loss.device) if w is None else w.to(task_loss.dtype)
        with torch.no_grad():
            self._seen[0] += int(((domain_logits > 0).float() == domain_labels).sum())
            self._seen[1] += 2 * n
        total = (w * task_loss).sum() + 0.5 * (w * (domain_loss[:n] + domain_loss[n:])).sum()
        return total / normalizer

    # ---- evaluation and files -------------------------------------------------------------------
    @torch.no_grad()
    def _domain_predictions(self, model: nn.Module, rows: list[dict[str, Any]], size: int, device: torch.device
                            ) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(rows), size):
            b = token_batch(rows[i:i + size], self.pad_token_id, device)
            out += (domain_head_of(model)(pooled_hidden(model, b)) > 0).tolist()
        return out

    def evaluate(self, model: nn.Module, batches: list[Batch] | None) -> dict[str, Any]:
        metrics = evaluate_classifier(model, batches, task=self.task, label_map=self.label_map)
        size = batches[0]["input_ids"].shape[0] if batches else 16
        device = next(model.parameters()).device
        target_rows = self.target.eval or []
        if target_rows:
            target_batches = []
            for i in range(0, len(target_rows), size):
                b = collate(target_rows[i:i + size], pad_token_id=self.pad_token_id)
                target_batches.append({k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels")})
            target = evaluate_classifier(model, target_batches, task=self.task, label_map=self.label_map)
            metrics.update({f"target_{k.removeprefix('eval_')}": v for k, v in target.items()})
        # domain accuracy: source eval rows (0) against as many target rows (1)
        was_training = model.training
        model.eval()
        try:
            source = [{"input_ids": b["input_ids"][r][b["attention_mask"][r].bool()].tolist()}
                      for b in batches or [] for r in range(b["input_ids"].shape[0])]
            if source:
                pool = target_rows or self.target.train
                picked = [pool[i] for i in range(0, len(pool), max(1, len(pool) // len(source)))][:len(source)]
                said = (self._domain_predictions(model, source, size, device)
                        + self._domain_predictions(model, picked, size, device))
                truth = [False] * len(source) + [True] * len(picked)
                metrics["domain_accuracy"] = sum(a == b for a, b in zip(said, truth)) / len(truth)
        finally:
            model.train(was_training)
        metrics["dann_lambda"] = self.lam
        return metrics

    def step_metrics(self) -> dict[str, Any]:
        """λ and the domain head's accuracy on the training rows since the previous train log record."""
        seen, self._seen = self._seen, [0, 0]
        return {"dann_lambda": self.lam, **({"domain_accuracy": seen[0] / seen[1]} if seen[1] else {})}

    def save(self, model: nn.Module, adapter_dir: Path) -> None:
        """The classification head and, beside it, the domain head (neither goes into the PEFT adapter file)."""
        save_head(model, adapter_dir)
        save_domain_head(model, adapter_dir)

    def prepare(self, model: nn.Module, train_batches: Any) -> None:
        """Nothing to precompute."""

    def fingerprints(self) -> dict[str, dict[str, Any]]:
        """The target training rows' content per ``dann.target[i]``: a checkpoint keeps it and a resume onto
        changed target files is refused (:func:`peftlab.trainer.state.check_input_fingerprints`)."""
        return self.target.fingerprints


def build_dann_objective(recipe: Any, loaded: Any, data: Any) -> DomainAdversarialObjective:
    """The DANN objective of ``recipe`` (the classification head is attached already): target rows read and
    tokenized, the domain head attached after the classification head."""
    dann = recipe.dann
    target = build_target_data(dann, recipe.data, loaded.tokenizer, task=data.task, label_map=data.label_map,
                               base_dir=Path(recipe.base_dir))
    attach_domain_head(loaded.model, head_of(loaded.model).score.in_features, dann.head.hidden_size,
                       lr=dann.head.lr)
    return DomainAdversarialObjective(task=data.task, label_map=data.label_map, target=target,
                                      pad_token_id=data.pad_token_id, seed=recipe.train.seed,
                                      schedule=dann.schedule, lambda_max=dann.lambda_max)
