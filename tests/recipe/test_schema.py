"""The recipe's sections and Recipe: the defaults a practitioner expects, the combinations no single section
can check, the helpers every stage uses (paths, fingerprints), and the README's reference table."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from peftlab.recipe.schema import CheckpointConfig, DistillConfig, Recipe, reference_markdown

DATA = {"train": ["train.jsonl"]}


def recipe(**sections) -> Recipe:
    return Recipe(data=DATA, **sections)


def test_defaults_are_qlora_practitioner_defaults():
    r = recipe(base_dir="/recipes")
    assert r.model.name == "builtin:tiny-llama"
    assert (r.quantization.mode, r.quantization.double_quant, r.quantization.blocksize) == ("nf4", True, 64)
    assert (r.adapter.r, r.adapter.alpha, r.adapter.dropout, r.adapter.target_modules) == (16, 32, 0.05, "all-linear")
    assert (r.train.optimizer, r.train.scheduler, r.train.max_grad_norm) == ("adamw", "cosine", 1.0)
    assert (r.train.lr, r.train.warmup_ratio, r.train.seed) == (2e-4, 0.03, 42)
    assert (r.kernels, r.task, r.distill, r.resume) == ("auto", "causal_lm", None, None)
    assert r.output_dir == Path("/recipes/runs/peftlab")  # relative to the recipe file's directory


@pytest.mark.parametrize("sections, message", [
    ({"quantization": {"mode": "nf4"}, "model": {"dtype": "float16"}, "train": {"device": "cpu"}},
     "float16 on train.device=cpu"),
    ({"adapter": {"dora": True}, "kernels": "triton"}, "does not implement DoRA"),
    ({"model": {"attn_implementation": "flash_attention_2"}, "train": {"device": "cpu"}}, "needs a CUDA GPU"),
    ({"train": {"early_stopping": {"patience": 2}}}, "train.early_stopping needs train.eval_every"),
    ({"task": "classification", "resume": "auto", "deepspeed": "z.json"}, "under deepspeed, is not supported yet"),
    ({"adapter": {"unfreeze": ["embeddings"]}, "resume": "auto"}, "resume with adapter.unfreeze"),
    ({"task": "regression", "data": {**DATA, "packing": True}}, "cannot be combined with distill or data.packing"),
    ({"task": "classification", "data": {**DATA, "label_type": "regression"}}, "set data.label_type: auto"),
    ({"distill": {"teacher": "builtin:tiny-llama"}, "train": {"loss": {"z_loss": 1e-4}}},
     "the distillation loss does not implement them"),
    ({"deepspeed": "zero3.yaml"}, "DeepSpeed JSON config"),
    ({"checkpoint": {"dir": "../elsewhere"}}, "relative folder inside output.dir"),
])
def test_combinations_are_refused_with_the_fix(sections, message):
    data = sections.pop("data", DATA)
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        Recipe(data=data, **sections)


def test_the_task_decides_the_label_type():
    assert Recipe(data=DATA, task="classification").data.label_type == "class"
    assert Recipe(data=DATA, task="regression").data.label_type == "regression"
    assert Recipe(data=DATA).data.label_type == "auto"


def test_distill_teacher_shorthand_and_a_nameless_teacher():
    assert DistillConfig(teacher="builtin:tiny-llama").teacher.name == "builtin:tiny-llama"
    assert DistillConfig(teacher={"adapter": "runs/q/adapter"}).teacher.name is None  # the adapter names its base
    with pytest.raises(ValidationError, match="distill.teacher needs a name"):
        DistillConfig(teacher={})
    for bad in ("/abs", "~/x", "", "a/../../b"):
        with pytest.raises(ValidationError, match="relative folder"):
            CheckpointConfig(dir=bad)


def test_resolve_path_and_fingerprint():
    r = recipe(base_dir="/recipes")
    assert r.resolve_path("data/x.jsonl") == Path("/recipes/data/x.jsonl")
    assert r.resolve_path("/abs/x.jsonl") == Path("/abs/x.jsonl")
    assert r.resolve_path("~/x") == Path.home() / "x"
    same = recipe(base_dir="/elsewhere")  # where the recipe sits is no part of what it says
    assert r.fingerprint() == same.fingerprint() and len(r.fingerprint()) == 16
    other = recipe(train={"lr": 1e-3})
    assert other.fingerprint() != r.fingerprint()
    assert other.fingerprint("model", "adapter") == r.fingerprint("model", "adapter")
    assert "base_dir" not in r.to_dict()


def test_reference_table_names_every_key_its_type_and_default():
    rows = {line.split(" | ")[0].strip("| `"): line for line in reference_markdown().splitlines()[2:]}
    assert rows["train.lr"] == "| `train.lr` | float | `0.0002` |"
    assert rows["data"] == "| `data` | section | required |"
    assert rows["data.train[].path"].endswith("| required |")
    assert rows["adapter.target_modules"] == ("| `adapter.target_modules` | Union[Literal['all-linear'], list[str]] "
                                              "| `\"all-linear\"` |")
    # optional sections are one row typed by their bare class name (no module path)
    assert rows["distill"] == "| `distill` | DistillConfig \\| None | `null` |"
    assert "base_dir" not in rows
    assert set(rows) >= {f"train.{k}" for k in Recipe.model_fields["train"].annotation.model_fields
                         if k not in ("loss",)}
