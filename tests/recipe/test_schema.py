"""Recipe schema: defaults, overrides, and the clear messages every bad input gets."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftlab.errors import PeftlabError
from peftlab.recipe.schema import load_recipe, recipe_from_dict

MINIMAL = {"data": {"train": ["train.jsonl"]}}


def write(tmp_path: Path, raw) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return p


def test_defaults_are_qlora_practitioner_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.model.name == "builtin:tiny-llama"
    assert (r.quantization.mode, r.quantization.double_quant) == ("nf4", True)
    assert (r.adapter.r, r.adapter.alpha, r.adapter.target_modules) == (16, 32, "all-linear")
    assert (r.train.optimizer, r.train.scheduler, r.train.max_grad_norm) == ("adamw", "cosine", 1.0)
    assert r.train.warmup_ratio > 0 and isinstance(r.train.seed, int)
    assert r.kernels == "auto"
    # relative paths resolve against the recipe's directory
    assert r.output_dir == tmp_path / "runs" / "peftlab"


def test_set_overrides_are_typed_and_validated(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), overrides=["train.lr=1e-4", "adapter.target_modules=[q_proj,v_proj]",
                                                         "model.gradient_checkpointing=true"])
    assert r.train.lr == pytest.approx(1e-4)
    assert r.adapter.target_modules == ["q_proj", "v_proj"]
    assert r.model.gradient_checkpointing is True
    with pytest.raises(PeftlabError, match=r"train\.lr: .*greater than 0"):
        load_recipe(write(tmp_path, MINIMAL), overrides=["train.lr=-1"])
    with pytest.raises(PeftlabError, match="expected KEY=VALUE"):
        load_recipe(write(tmp_path, MINIMAL), overrides=["train.lr"])


@pytest.mark.parametrize("raw, message", [
    ({**MINIMAL, "train": {"learning_rate": 1e-4}}, r"train\.learning_rate: unknown key.*known keys"),
    ({**MINIMAL, "adapter": {"rank": 8}}, r"adapter\.rank: unknown key — did you mean 'adapter\.r'"),
    ({**MINIMAL, "trian": {}}, r"trian: unknown key — did you mean 'train'"),
    ({**MINIMAL, "train": {"micro_batch_size": "four"}}, r"train\.micro_batch_size: .*integer.*'four'"),
    ({**MINIMAL, "quantization": {"mode": "int3"}}, r"quantization\.mode: .*'nf4'"),
    ({"model": {}}, r"data: required key is missing"),
    ({**MINIMAL, "quantization": {"mode": "nf4"}, "model": {"dtype": "float16"}, "train": {"device": "cpu"}},
     r"float16 on train\.device=cpu"),
    ({**MINIMAL, "adapter": {"dora": True}, "kernels": "triton"}, r"does not implement DoRA"),
    ({**MINIMAL, "deepspeed": "zero3.yaml"}, r"DeepSpeed JSON config"),
])
def test_bad_recipes_name_the_key_and_the_fix(tmp_path, raw, message):
    with pytest.raises(PeftlabError, match=message):
        load_recipe(write(tmp_path, raw))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(PeftlabError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(PeftlabError, match="not valid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed"))
    with pytest.raises(PeftlabError, match="top level must be a mapping"):
        recipe_from_dict(["a"])  # type: ignore[arg-type]


def test_unknown_model_and_missing_model_dir(tmp_path):
    from peftlab.model.load import resolve_model_path

    with pytest.raises(PeftlabError, match="unknown built-in model 'builtin:nope'; available: builtin:tiny-llama"):
        resolve_model_path("builtin:nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftlabError, match="without a config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(PeftlabError, match="no such directory"):
        resolve_model_path("./does/not/exist")


def test_tokenizer_only_directory_loads(tmp_path):
    """model.tokenizer may name a directory holding only tokenizer files (no config.json)."""
    from peftlab.model.builtin import build_tokenizer
    from peftlab.model.load import load_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "tok")
    assert not (tmp_path / "tok" / "config.json").exists()
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok("hello world")["input_ids"] == build_tokenizer()("hello world")["input_ids"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftlabError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))


def test_cli_reports_errors_without_traceback_and_nonzero_exit(tmp_path):
    bad = write(tmp_path, {**MINIMAL, "train": {"lr_rate": 1}})
    proc = subprocess.run([sys.executable, "-P", "-m", "peftlab.cli.main", "train", str(bad)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "peftlab: error: invalid recipe" in proc.stderr and "train.lr_rate: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
