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

The trainer only sees a loss callable with the signature of :func:`peftlab.loss.causal_lm_loss`,
``(model, batch, *, normalizer, settings) -> scalar``: a sum over target tokens divided by
``normalizer`` (the target tokens of the whole optimizer step), so gradient accumulation stays exact.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.objectives.causal_lm import (
    IGNORE_INDEX,
    LossSettings,
    final_hidden_states,
    model_inputs,
    output_head,
    shifted_labels,
)

DEFAULT_SETTINGS = LossSettings()


# ---- the teacher ---------------------------------------------------------------------------------


@dataclass
class Teacher:
    """A frozen teacher model and its tokenizer; ``label`` names it in messages and cache manifests."""

    model: nn.Module
    tokenizer: Any
    name: str
    adapter: str | None
    label: str


def teacher_base_name(recipe: Any) -> str:
    """The teacher's base model: ``distill.teacher.name``, else the base its adapter was trained on."""
    t = recipe.distill.teacher
    if t.name is not None:
        return t.name
    cfg = _adapter_config(recipe.resolve_path(t.adapter))
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise PeftlabError(f"distill.teacher.adapter {t.adapter}: its adapter_config.json names no base model "
                           "(base_model_name_or_path); set distill.teacher.name")
    return base


def _adapter_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise PeftlabError(
            f"distill.teacher.adapter: no adapter at {path} (adapter_config.json missing); train the teacher "
            "first (e.g. `peftlab quickstart` writes runs/quickstart/adapter) or fix the path"
        )
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise PeftlabError(f"distill.teacher.adapter: {cfg_file} is not valid JSON ({exc})") from None


def teacher_label(recipe: Any) -> str:
    t = recipe.distill.teacher
    name = teacher_base_name(recipe)
    return f"{name} + adapter {t.adapter}" if t.adapter else name


def teacher_quantization(recipe: Any) -> Any:
    """The teacher's quantization: its own section, else what its adapter was trained on, else the recipe's."""
    from peftlab.recipe.schema import QuantizationConfig

    t = recipe.distill.teacher
    if t.quantization is not None:
        return t.quantization
    if t.adapter:
        path = recipe.resolve_path(t.adapter)
        stored = _adapter_config(path).get("peftlab", {}).get("quantization")
        if not stored and (path / "peftlab_recipe.yaml").is_file():  # written beside adapters by `peftlab train`
            import yaml

            stored = (yaml.safe_load((path / "peftlab_recipe.yaml").read_text()) or {}).get("quantization")
        if stored:
            return QuantizationConfig(**stored)
    return recipe.quantization


def load_teacher(recipe: Any, device: torch.device, *, student_dtype: torch.dtype | None = None) -> Teacher:
    """Load the frozen teacher of ``recipe.distill`` on ``device`` (eval mode, no parameter needs grad)."""
    from peftlab.adapters.peft_format import load_adapter
    from peftlab.model.load import load_base_model, load_tokenizer, pick_dtype

    t = recipe.distill.teacher
    name = teacher_base_name(recipe)
    dtype = pick_dtype(t.dtype or recipe.model.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise PeftlabError("distill.teacher.dtype=float16 is not usable on the CPU; use float32 or bfloat16")
    tokenizer = load_tokenizer(t.tokenizer or name, revision=t.revision, trust_remote_code=t.trust_remote_code)
    model = load_base_model(name, dtype=dtype, device=device, quant=teacher_quantization(recipe),
                            attn_implementation=recipe.model.attn_implementation, revision=t.revision,
                            trust_remote_code=t.trust_remote_code)
    adapter = None
    if t.adapter:
        path = recipe.resolve_path(t.adapter)
        _adapter_config(path)  # a clear error when it is missing
        backend = "torch" if recipe.kernels == "off" else recipe.kernels
        load_adapter(model, path, kernel_backend=backend, trainable=False)
        adapter = str(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, tokenizer, name, adapter, teacher_label(recipe))


# ---- the vocabulary check ------------------------------------------------------------------------


def vocab_fingerprint(tokenizer: Any) -> str:
    """Hash of the token -> id map: equal exactly when two tokenizers share a vocabulary."""
    import hashlib

    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:32]


def check_same_vocab(student_tokenizer: Any, teacher_tokenizer: Any, *, student: str, teacher: str) -> None:
    """Distillation compares distributions token id by token id: both must map the same tokens to the
    same ids. A mismatch is a :class:`PeftlabError` naming both models and the first differences."""
    sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if sv == tv:
        return
    s_by_id = {i: tok for tok, i in sv.items()}
    t_by_id = {i: tok for tok, i in tv.items()}
    diffs = [i for i in sorted(set(s_by_id) | set(t_by_id)) if s_by_id.get(i) != t_by_id.get(i)]
    shown = "; ".join(f"id {i}: student {s_by_id.get(i)!r} vs teacher {t_by_id.get(i)!r}" for i in diffs[:3])
    raise PeftlabError(
        f"distill: the teacher {teacher!r} ({len(tv)} tokens) and the student model.name {student!r} "
        f"({len(sv)} tokens) do not share a vocabulary ({len(diffs)} ids differ; {shown}). Distillation "
        "compares next-token distributions id by id, so both need the same tokenizer (e.g. "
        "Llama-3.1-8B -> Llama-3.2-1B); pick a teacher of the student's family or set distill.teacher.tokenizer"
    )


def shared_head_rows(student_head: torch.Tensor, teacher_head: torch.Tensor, vocab_len: int, *, student: str,
                     teacher: str) -> int:
    """Rows of the output heads to compare. Heads are often padded past the tokenizer (to a multiple
    of 64 or 128) by different amounts; rows past the real vocabulary are never a token, so comparing
    the first min(rows) is exact as long as both cover the vocabulary."""
    vs, vt = student_head.shape[0], teacher_head.shape[0]
    if vs == vt:
        return vs
    if min(vs, vt) < vocab_len:
        raise PeftlabError(
            f"distill: the output heads of the student {student!r} ({vs} rows) and teacher {teacher!r} ({vt} "
            f"rows) do not both cover the {vocab_len}-token vocabulary; they cannot be compared"
        )
    return min(vs, vt)


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

    Same signature as :func:`peftlab.loss.causal_lm_loss`. ``kernels: off`` uses the plain-PyTorch
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
        from peftlab.kernels import fused_linear_kd_loss, reference_linear_kd_loss

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
        from peftlab.kernels import topk_kd_loss

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


def default_cache_dir(recipe: Any) -> Path:
    d = recipe.distill
    return recipe.resolve_path(d.cache_dir) if d.cache_dir else recipe.output_dir / "teacher-cache"


def build_distill_loss(recipe: Any, loaded: Any, *, teacher: Teacher | None = None):
    """The trainer's loss callable for ``recipe.distill`` and the loaded student (a
    :class:`peftlab.models.LoadedModel`): online loads the teacher (or uses ``teacher``) and checks
    the vocabularies; offline opens and validates the teacher cache."""
    d = recipe.distill
    if d is None:
        raise PeftlabError("build_distill_loss: the recipe has no distill section")
    if getattr(loaded.model.config, "final_logit_softcapping", None):
        raise PeftlabError("distill: the student uses final-logit soft-capping, which the distillation loss "
                           "does not implement")
    opts = {"kind": d.kind, "beta": d.beta, "temperature": d.temperature, "alpha": d.alpha}
    if d.mode == "offline":
        from peftlab.objectives.teacher_cache import TeacherCache

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
