"""Distillation fine-tuning: a teacher's per-token distributions train a LoRA student.

The recipe's ``distill:`` section turns the training loss into

    L = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(p_teacher, p_student)

over the same target tokens as plain fine-tuning (D = forward KL, reverse KL or JSD; see
:mod:`peftlab.kernels.fused_linear_kd_loss`). Two ways to get the teacher's distributions:

- ``mode: online`` — the teacher (its own quantization, optionally its own frozen adapter) runs in
  the training process under ``no_grad``; its final hidden states and head go to
  :func:`~peftlab.kernels.fused_linear_kd_loss`, so neither model's logits exist whole in memory.
- ``mode: offline`` — ``peftlab distill-cache RECIPE`` ran the teacher once and stored its top-k
  log-probabilities per target token (:mod:`peftlab.objectives.teacher_cache`); training reads the rows of the
  batch's ``sample_ids`` and uses :func:`~peftlab.kernels.topk_kd_loss` (both distributions
  renormalised over the teacher's k ids; with k = vocabulary size it equals the online loss).

The trainer sees a :class:`DistillationObjective` (:mod:`peftlab.objectives.objective`): its loss is a sum over
target tokens divided by ``normalizer`` (the target tokens of the whole optimizer step), so gradient accumulation
stays exact, and it is evaluated like plain fine-tuning (held-out cross-entropy, generated answers). The
teacher itself (loading, vocabulary checks) is :mod:`peftlab.objectives.teacher`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.evaluation.evaluate import evaluate
from peftlab.kernels import fused_linear_kd_loss, reference_linear_kd_loss, topk_kd_loss
from peftlab.objectives.causal_lm import (
    IGNORE_INDEX,
    LossSettings,
    count_targets,
    final_hidden_states,
    loss_normalizer,
    model_inputs,
    output_head,
    shifted_labels,
)
from peftlab.objectives.teacher import (
    Teacher,
    check_same_vocab,
    default_cache_dir,
    load_teacher,
    shared_head_rows,
)
from peftlab.objectives.teacher_cache import TeacherCache

DEFAULT_SETTINGS = LossSettings()


# ---- the losses ----------------------------------------------------------------------------------


def _token_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Per-token loss weights after the shift (mixture weights), or None when all are one."""
    w = batch.get("loss_weights")
    if w is None:
        return None
    w = F.pad(w[:, 1:], (0, 1), value=0.0).float()
    return None if bool((w == 1).all()) else w


def _reduce(per_token_or_sum: torch.Tensor, weights: torch.Tensor | None, normalizer: float) -> torch.Tensor:
    if weights is None:
        return per_token_or_sum
    return (per_token_or_sum * weights).sum() / normalizer


class OnlineDistillLoss:
    """The training loss with a live teacher: fused linear KD loss between the two heads.

    Same signature as :func:`peftlab.objectives.causal_lm.causal_lm_loss`. ``kernels: off`` uses the plain-PyTorch
    reference (whole fp32 logits) instead of the chunked kernel, for comparison and debugging.
    """

    def __init__(self, teacher: Teacher, *, kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 alpha: float = 0.5, student_name: str = "student", vocab_len: int | None = None):
        self.teacher = teacher
        self.kind, self.beta, self.temperature, self.alpha = kind, beta, temperature, alpha
        self.student_name = student_name
        self.vocab_len = vocab_len if vocab_len is not None else len(teacher.tokenizer)

    def teacher_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return final_hidden_states(self.teacher.model, batch)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], *, normalizer: float,
                 settings: LossSettings = DEFAULT_SETTINGS) -> torch.Tensor:
        labels = shifted_labels(batch["labels"])
        weights = _token_weights(batch)
        t_hidden = self.teacher_hidden(batch)
        s_hidden = final_hidden_states(model, batch)
        s_head, t_head = output_head(model), output_head(self.teacher.model)
        rows = shared_head_rows(s_head.weight, t_head.weight, self.vocab_len, student=self.student_name,
                                teacher=self.teacher.label)
        fn = reference_linear_kd_loss if settings.backend == "off" else fused_linear_kd_loss
        backend = "torch" if settings.backend == "off" else settings.backend
        out = fn(s_hidden, s_head.weight[:rows], t_hidden, t_head.weight[:rows], labels, kind=self.kind,
                 beta=self.beta, temperature=self.temperature, alpha=self.alpha, ignore_index=IGNORE_INDEX,
                 student_bias=None if s_head.bias is None else s_head.bias[:rows],
                 teacher_bias=None if t_head.bias is None else t_head.bias[:rows],
                 reduction="sum" if weights is None else "none",
                 normalizer=normalizer if weights is None else None, backend=backend)
        return _reduce(out, weights, normalizer)

    def teacher_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher log-softmax (T = 1) over the whole vocabulary, (B, T, V) fp32 — for evaluation only."""
        with torch.no_grad():
            return F.log_softmax(self.teacher.model(**model_inputs(batch), use_cache=False).logits.float(), -1)


class OfflineDistillLoss:
    """The training loss from a stored teacher cache: top-k KD loss on the rows of the batch's samples."""

    def __init__(self, cache: Any, *, kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 alpha: float = 0.5):
        self.cache = cache
        self.kind, self.beta, self.temperature, self.alpha = kind, beta, temperature, alpha

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], *, normalizer: float,
                 settings: LossSettings = DEFAULT_SETTINGS) -> torch.Tensor:
        labels = shifted_labels(batch["labels"])
        weights = _token_weights(batch)
        logprobs, ids = self.cache.lookup(batch)
        hidden = final_hidden_states(model, batch)
        head = output_head(model)
        out = topk_kd_loss(hidden, head.weight, logprobs.to(hidden.device), ids.to(hidden.device), labels,
                           kind=self.kind, beta=self.beta, temperature=self.temperature, alpha=self.alpha,
                           ignore_index=IGNORE_INDEX, student_bias=head.bias,
                           reduction="sum" if weights is None else "none",
                           normalizer=normalizer if weights is None else None)
        return _reduce(out, weights, normalizer)


def build_distill_loss(recipe: Any, loaded: Any, *, teacher: Teacher | None = None):
    """The trainer's loss callable for ``recipe.distill`` and the loaded student (a
    :class:`peftlab.model.load.LoadedModel`): online loads the teacher (or uses ``teacher``) and checks
    the vocabularies; offline opens and validates the teacher cache."""
    d = recipe.distill
    if d is None:
        raise PeftlabError("build_distill_loss: the recipe has no distill section")
    if getattr(loaded.model.config, "final_logit_softcapping", None):
        raise PeftlabError("distill: the student uses final-logit soft-capping, which the distillation loss "
                           "does not implement")
    opts = {"kind": d.kind, "beta": d.beta, "temperature": d.temperature, "alpha": d.alpha}
    if d.mode == "offline":
        cache = TeacherCache.open(default_cache_dir(recipe), student_tokenizer=loaded.tokenizer,
                                  student=recipe.model.name, vocab_rows=output_head(loaded.model).weight.shape[0],
                                  top_k=d.top_k)
        return OfflineDistillLoss(cache, **opts)
    teacher = teacher or load_teacher(recipe, loaded.device)
    check_same_vocab(loaded.tokenizer, teacher.tokenizer, student=recipe.model.name, teacher=teacher.label)
    return OnlineDistillLoss(teacher, student_name=recipe.model.name, vocab_len=len(loaded.tokenizer), **opts)


# ---- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def teacher_kl(student: nn.Module, teacher: nn.Module, batches, *, temperature: float = 1.0) -> float:
    """Token-mean forward KL(p_teacher || p_student) over the target tokens of ``batches`` (held-out
    data): how far the student still is from the teacher. Plain full-logit fp32 computation."""
    was_training = student.training
    student.eval()
    total, n = 0.0, 0
    try:
        for batch in batches:
            labels = shifted_labels(batch["labels"])
            mask = labels != IGNORE_INDEX
            if not bool(mask.any()):
                continue
            s = student(**model_inputs(batch), use_cache=False).logits.float()[mask] / temperature
            t = teacher(**model_inputs(batch), use_cache=False).logits.float()[mask] / temperature
            rows = min(s.shape[-1], t.shape[-1])
            log_ps, log_pt = F.log_softmax(s[:, :rows], -1), F.log_softmax(t[:, :rows], -1)
            total += float((log_pt.exp() * (log_pt - log_ps)).sum())
            n += int(mask.sum())
    finally:
        student.train(was_training)
    return total / n if n else float("nan")


# ---- the objective -------------------------------------------------------------------------------


@dataclass
class DistillationObjective:
    """The trainer's objective for a ``distill:`` recipe: the KD loss (online teacher or offline cache) over the
    same target tokens as plain fine-tuning, evaluated like plain fine-tuning (held-out cross-entropy, generated
    answers) so the numbers compare with a run without a teacher."""

    kd: OnlineDistillLoss | OfflineDistillLoss
    settings: LossSettings = field(default_factory=LossSettings)
    tokenizer: Any = None
    eval_prompts: list[dict[str, Any]] = field(default_factory=list)
    recipe: Any = None

    @property
    def teacher(self) -> Teacher | None:
        """The live teacher (online mode); None when the teacher's outputs come from a cache."""
        return getattr(self.kd, "teacher", None)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], *, normalizer: float) -> torch.Tensor:
        return self.kd(model, batch, normalizer=normalizer, settings=self.settings)

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        return count_targets(batch)

    def normalizer(self, batch: dict[str, torch.Tensor]) -> float:
        return loss_normalizer(batch)

    def evaluate(self, model: nn.Module, batches: list[dict[str, torch.Tensor]] | None) -> dict[str, Any]:
        return evaluate(model, self.tokenizer, batches, self.eval_prompts, recipe=self.recipe, settings=self.settings)

    def save(self, model: nn.Module, adapter_dir: Path) -> None:
        """Nothing beside the adapter (the teacher is named in the recipe saved with it)."""

    def prepare(self, model: nn.Module, train_batches: Any) -> None:
        """Nothing to precompute."""

    def begin_step(self, step: int, total_steps: int) -> None:
        """No schedule."""
