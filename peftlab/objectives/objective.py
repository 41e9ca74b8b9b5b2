"""The seam between the training loop and what is learned: one objective object per kind of run.

The loop asks its objective five things and never which task it trains:

- ``loss(model, batch, normalizer=...)``: the micro-batch's summed (weighted) loss divided by ``normalizer``;
- ``targets(batch)`` / ``normalizer(batch)``: what a step is normalised by — its target tokens (rows for
  classification) and their summed loss weights — counted over every micro-batch of the step before any loss
  is computed, so gradient accumulation gives exactly the gradient of the whole step's mean;
- ``evaluate(model, batches)``: the run's eval metrics on held-out batches (``None``: no eval data);
- ``save(model, adapter_dir)``: the objective's own files beside the adapter (a classification head);
- ``prepare(model, train_batches)``: once, before the first step (and again after a resume) — e.g. reference
  log-probs computed once for the training data; ``train_batches(indices)`` builds batches like the loop's;
- ``begin_step(step, total_steps)``: before every optimizer step — for terms that follow the run's progress
  (a schedule).

Optionally ``step_metrics()``: figures of the steps since the last train log record (e.g. a preference run's
rewards), merged into that record by :func:`train_figures`; every rank calls it at the same steps. Optionally
``trained_tokens(batch)``: the tokens a micro-batch trains, where its targets are not tokens (a preference run's
targets are pairs, its tokens the answers' tokens): what the run's ``tokens_seen`` counts (:func:`trained_tokens`).
Optionally ``fingerprints()``: ``{recipe key: {"path", "rows", "fingerprint"}}`` of data the objective reads
besides ``data.train`` (a DANN run's target rows): kept in every checkpoint, and a resume onto other content is
refused (:func:`peftlab.trainer.state.check_input_fingerprints`).

:func:`build_objective` picks it from the recipe: :class:`CausalLMObjective` (next-token cross-entropy, the
default), :class:`~peftlab.objectives.distillation.DistillationObjective` (``distill:``) or
:class:`~peftlab.objectives.classification.ClassificationObjective` (``task: classification | regression``).
A new training method (preference pairs, a domain-adversarial term) is a new objective class and one line in
:func:`build_objective`, not a branch in the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from peftlab.engine.process_group import all_reduce_sum
from peftlab.evaluation.evaluate import evaluate
from peftlab.model.classifier import attach_head
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss, count_targets, loss_normalizer
from peftlab.objectives.classification import ClassificationObjective
from peftlab.objectives.distillation import DistillationObjective, build_distill_loss
from peftlab.objectives.domain_adversarial import build_dann_objective
from peftlab.objectives.preference import build_preference_objective

Batch = dict[str, torch.Tensor]


@runtime_checkable
class Objective(Protocol):
    """What a training run learns (see the module docstring)."""

    def loss(self, model: nn.Module, batch: Batch, *, normalizer: float) -> torch.Tensor:
        ...

    def targets(self, batch: Batch) -> int:
        ...

    def normalizer(self, batch: Batch) -> float:
        ...

    def evaluate(self, model: nn.Module, batches: list[Batch] | None) -> dict[str, Any]:
        ...

    def save(self, model: nn.Module, adapter_dir: Path) -> None:
        ...

    def prepare(self, model: nn.Module, train_batches: Any) -> None:
        ...

    def begin_step(self, step: int, total_steps: int) -> None:
        ...


@dataclass
class CausalLMObjective:
    """Next-token cross-entropy on the trained tokens (fused with the head: never whole logits); evaluated by
    held-out loss / perplexity and, when ``eval.metric`` asks for it, exact match of generated answers."""

    settings: LossSettings = field(default_factory=LossSettings)
    tokenizer: Any = None             # evaluation only (generated answers are decoded)
    eval_prompts: list[dict[str, Any]] = field(default_factory=list)
    recipe: Any = None                # evaluation only (the eval section)

    def loss(self, model: nn.Module, batch: Batch, *, normalizer: float) -> torch.Tensor:
        return causal_lm_loss(model, batch, normalizer=normalizer, settings=self.settings)

    def targets(self, batch: Batch) -> int:
        return count_targets(batch)

    def normalizer(self, batch: Batch) -> float:
        return loss_normalizer(batch)

    def evaluate(self, model: nn.Module, batches: list[Batch] | None) -> dict[str, Any]:
        return evaluate(model, self.tokenizer, batches, self.eval_prompts, recipe=self.recipe, settings=self.settings)

    def save(self, model: nn.Module, adapter_dir: Path) -> None:
        """Nothing beside the adapter."""

    def prepare(self, model: nn.Module, train_batches: Any) -> None:
        """Nothing to precompute."""

    def begin_step(self, step: int, total_steps: int) -> None:
        """No schedule."""


def train_figures(objective: Objective) -> dict[str, Any]:
    """The objective's own figures for a train log record (its optional ``step_metrics``; none for most)."""
    step_metrics = getattr(objective, "step_metrics", None)
    return step_metrics() if step_metrics is not None else {}


def trained_tokens(objective: Objective, batches: list[Batch], n_targets: int) -> int:
    """Tokens one optimizer step trained, summed over ranks (the run's ``tokens_seen``): the objective's own
    ``trained_tokens`` where its targets are not tokens, else the step's targets ``n_targets`` (summed already)."""
    count = getattr(objective, "trained_tokens", None)
    return n_targets if count is None else all_reduce_sum(sum(int(count(b)) for b in batches))


def build_objective(recipe: Any, loaded: Any, data: Any) -> Objective:
    """The objective of ``recipe`` for the loaded model (:class:`peftlab.model.load.LoadedModel`) and its data
    (:class:`peftlab.data.build.DataBundle`). A classification run gets its head attached to the model here (its
    label space comes from the data); a distillation run loads its teacher or opens its teacher cache."""
    if recipe.task != "causal_lm":
        attach_head(loaded.model, data, recipe)
        if recipe.dann is not None:  # DANN: + target rows and a domain head
            return build_dann_objective(recipe, loaded, data)
        return ClassificationObjective(task=data.task, label_map=data.label_map)
    if recipe.preference is not None:  # DPO / IPO / robust / ORPO / SimPO / KTO on pairs or labelled completions
        return build_preference_objective(recipe, loaded, data)
    settings = LossSettings.from_recipe(recipe, loaded.model)
    if recipe.distill is not None:
        return DistillationObjective(build_distill_loss(recipe, loaded), settings, loaded.tokenizer,
                                     data.eval_prompts, recipe)
    return CausalLMObjective(settings, loaded.tokenizer, data.eval_prompts, recipe)
