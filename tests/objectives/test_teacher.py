"""The distillation teacher: its base and quantization come from its adapter when the recipe does not name
them, it loads frozen, and a teacher without the student's vocabulary is one clear error naming both models and
the first differing tokens (online here; a cache of another vocabulary: test_teacher_cache.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from peftlab.errors import PeftlabError
from peftlab.objectives.distillation import build_distill_loss
from peftlab.objectives.teacher import (
    check_same_vocab,
    default_cache_dir,
    load_teacher,
    shared_head_rows,
    teacher_base_name,
    teacher_label,
    teacher_quantization,
    vocab_fingerprint,
)

pytestmark = pytest.mark.xdist_group("distill")


def other_vocab_model(tmp_path):
    """micro-llama's weights with one extra token in its tokenizer: same head size, different vocab."""
    from transformers import AutoTokenizer

    from peftlab.model.load import resolve_model_path

    d = tmp_path / "other-vocab"
    shutil.copytree(resolve_model_path("builtin:micro-llama"), d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(d)
    return d


def test_vocabulary_mismatch_is_a_clear_error(kd_trainer, tmp_path):
    from transformers import AutoTokenizer

    other = other_vocab_model(tmp_path)
    recipe = kd_trainer.recipe.model_copy(deep=True)
    recipe.distill.teacher.name, recipe.distill.teacher.adapter = str(other), None
    with pytest.raises(PeftlabError) as err:
        build_distill_loss(recipe, kd_trainer.loaded)
    msg = str(err.value)
    assert "do not share a vocabulary" in msg and str(other) in msg and "builtin:micro-llama" in msg
    assert "'<|extra|>'" in msg
    student, theirs = kd_trainer.tokenizer, AutoTokenizer.from_pretrained(other)
    assert vocab_fingerprint(student) != vocab_fingerprint(theirs)
    from peftlab.model.load import resolve_model_path

    assert vocab_fingerprint(student) == vocab_fingerprint(AutoTokenizer.from_pretrained(
        resolve_model_path("builtin:micro-llama")))
    check_same_vocab(student, student, student="a", teacher="b")  # the same vocabulary passes


def test_heads_padded_past_the_vocabulary_compare_their_shared_rows():
    a, b = torch.zeros(128, 4), torch.zeros(136, 4)
    assert shared_head_rows(a, b, 120, student="s", teacher="t") == 128
    assert shared_head_rows(b, b, 120, student="s", teacher="t") == 136
    with pytest.raises(PeftlabError, match=r"student 's' \(128 rows\) and teacher 't' \(136 rows\) do not both "
                                           r"cover the 130-token vocabulary"):
        shared_head_rows(a, b, 130, student="s", teacher="t")


def test_the_teacher_is_described_by_its_adapter(kd_trainer, teacher_adapter, tmp_path):
    recipe = kd_trainer.recipe.model_copy(deep=True)
    assert teacher_label(recipe) == f"builtin:micro-llama + adapter {teacher_adapter}"
    recipe.distill.teacher.name = None  # the base its adapter was trained on
    assert teacher_base_name(recipe) == "builtin:micro-llama"
    # quantization: its own section, else what its adapter was trained with (peftlab_recipe.yaml), else the recipe's
    assert teacher_quantization(recipe).mode == "none"
    adapter = tmp_path / "adapter"
    shutil.copytree(teacher_adapter, adapter)
    (adapter / "peftlab_recipe.yaml").write_text(yaml.safe_dump({"quantization": {"mode": "fp4"}}))
    recipe.distill.teacher.adapter, recipe.distill.teacher.quantization = str(adapter), None
    assert teacher_quantization(recipe).mode == "fp4"
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    with pytest.raises(PeftlabError, match="names no base model .*set distill.teacher.name"):
        teacher_base_name(recipe)
    recipe.distill.teacher.adapter = str(tmp_path / "nowhere")
    with pytest.raises(PeftlabError, match="distill.teacher.adapter: no adapter at .*nowhere"):
        teacher_base_name(recipe)
    recipe.distill.cache_dir = None
    assert default_cache_dir(recipe) == recipe.output_dir / "teacher-cache"


def test_the_teacher_loads_frozen_with_its_adapter(kd_trainer):
    teacher = load_teacher(kd_trainer.recipe, torch.device("cpu"))
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.adapter == kd_trainer.recipe.distill.teacher.adapter
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():  # its adapter is applied: it differs from the student's (untrained) base
        assert not torch.allclose(teacher.model(input_ids=ids).logits, kd_trainer.model(input_ids=ids).logits)
    recipe = kd_trainer.recipe.model_copy(deep=True)
    recipe.distill.teacher.dtype = "float16"
    with pytest.raises(PeftlabError, match="distill.teacher.dtype=float16 is not usable on the CPU"):
        load_teacher(recipe, torch.device("cpu"))
