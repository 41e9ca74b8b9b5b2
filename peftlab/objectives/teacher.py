"""The distillation teacher: which model (and adapter) it is, loading it frozen, and the vocabulary checks.

Used by the online distillation loss (:mod:`peftlab.objectives.distillation`, the teacher runs in the training
process) and by the offline teacher cache (:mod:`peftlab.objectives.teacher_cache`, it runs once, before
training). Distillation compares next-token distributions id by id, so teacher and student must share a
vocabulary; heads padded past it by different amounts are compared on their shared rows.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from peftlab.adapters.peft_format import load_adapter
from peftlab.errors import PeftlabError
from peftlab.model.load import load_base_model, load_tokenizer, pick_dtype
from peftlab.recipe.from_adapter import ADAPTER_RECIPE_NAME
from peftlab.recipe.schema import QuantizationConfig


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


def teacher_quantization(recipe: Any, *, missing_ok: bool = False) -> Any:
    """The teacher's quantization: its own section, else what its adapter was trained on, else the recipe's.
    ``missing_ok`` (the memory planner, its advice): an adapter not trained yet records nothing, so the recipe's —
    as at run time once it exists and records none; without it a missing adapter is refused by name."""
    t = recipe.distill.teacher
    if t.quantization is not None:
        return t.quantization
    if t.adapter and not (missing_ok and not (recipe.resolve_path(t.adapter) / "adapter_config.json").is_file()):
        path = recipe.resolve_path(t.adapter)
        stored = _adapter_config(path).get("peftlab", {}).get("quantization")
        if not stored and (path / ADAPTER_RECIPE_NAME).is_file():  # written beside adapters by `peftlab train`
            stored = (yaml.safe_load((path / ADAPTER_RECIPE_NAME).read_text()) or {}).get("quantization")
        if stored:
            return QuantizationConfig(**stored)
    return recipe.quantization


def load_teacher(recipe: Any, device: torch.device, *, student_dtype: torch.dtype | None = None) -> Teacher:
    """Load the frozen teacher of ``recipe.distill`` on ``device`` (eval mode, no parameter needs grad)."""
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


def default_cache_dir(recipe: Any) -> Path:
    """Where the offline teacher cache of ``recipe.distill`` lives (``distill.cache_dir``, else in output.dir)."""
    d = recipe.distill
    return recipe.resolve_path(d.cache_dir) if d.cache_dir else recipe.output_dir / "teacher-cache"
