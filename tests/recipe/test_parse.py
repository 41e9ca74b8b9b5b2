"""A recipe from YAML: relative paths, typed ``--set`` overrides, the one clear message every bad input gets
(did you mean ...), and the copy written beside an adapter reading back the same."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftlab.errors import PeftlabError
from peftlab.recipe.parse import ALIASES, apply_overrides, dump_recipe, load_recipe, recipe_from_dict

MINIMAL = {"data": {"train": ["train.jsonl"]}}


def write(tmp_path: Path, raw) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return p


def test_relative_paths_resolve_against_the_recipe_file(tmp_path, monkeypatch):
    monkeypatch.chdir(Path("/"))
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.base_dir == str(tmp_path.resolve())
    assert r.output_dir == tmp_path.resolve() / "runs" / "peftlab"
    assert r.resolve_path(r.data.train[0].path) == tmp_path.resolve() / "train.jsonl"


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
    with pytest.raises(PeftlabError, match=r"--set 'train\.lr\.x=1': 'lr' is not a section"):
        load_recipe(write(tmp_path, MINIMAL), overrides=["train.lr=1", "train.lr.x=1"])
    with pytest.raises(PeftlabError, match="not valid YAML"):
        load_recipe(write(tmp_path, MINIMAL), overrides=["train.betas=[0.9"])
    # sections the recipe does not have are created; the raw mapping is changed in place
    raw = apply_overrides({}, ["distill.teacher.name=builtin:micro-llama", "eval.metric=loss"])
    assert raw == {"distill": {"teacher": {"name": "builtin:micro-llama"}}, "eval": {"metric": "loss"}}


@pytest.mark.parametrize("raw, message", [
    ({**MINIMAL, "train": {"learning_rate": 1e-4}},
     r"train\.learning_rate: unknown key — did you mean 'train\.lr'\? \(known keys here: epochs, max_steps, "),
    ({**MINIMAL, "adapter": {"rank": 8}}, r"adapter\.rank: unknown key — did you mean 'adapter\.r'"),
    ({**MINIMAL, "adapter": {"lora_alpha": 8}}, r"adapter\.lora_alpha: unknown key — did you mean 'adapter\.alpha'"),
    ({**MINIMAL, "train": {"early_stopping": {"patiense": 2}}},
     r"train\.early_stopping\.patiense: unknown key — did you mean 'train\.early_stopping\.patience'"),
    ({**MINIMAL, "train": {"xyzzy": 1}}, r"train\.xyzzy: unknown key \(known keys here"),
    ({**MINIMAL, "trian": {}}, r"trian: unknown key — did you mean 'train'"),
    ({**MINIMAL, "train": {"micro_batch_size": "four"}}, r"train\.micro_batch_size: .*integer.*'four'"),
    ({**MINIMAL, "quantization": {"mode": "int3"}}, r"quantization\.mode: .*'nf4'"),
    ({"model": {}}, r"data: required key is missing"),
    ({**MINIMAL, "adapter": {"dora": True}, "kernels": "triton"},
     r"recipe\.yaml:\n  \(top level\): .*does not implement DoRA"),
])
def test_bad_recipes_name_the_key_and_the_fix(tmp_path, raw, message):
    with pytest.raises(PeftlabError, match=message):
        load_recipe(write(tmp_path, raw))


def test_every_bad_key_is_named_in_one_message(tmp_path):
    with pytest.raises(PeftlabError) as err:
        load_recipe(write(tmp_path, {**MINIMAL, "trian": {}, "adapter": {"r": 0, "rnak": 4}}))
    lines = str(err.value).splitlines()
    assert lines[0] == f"invalid recipe {tmp_path / 'recipe.yaml'}:"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["adapter.r", "adapter.rnak", "trian"]


def test_every_alias_points_at_a_real_key():
    """A key renamed in the schema would leave its PEFT/TRL/Axolotl alias suggesting nothing."""
    from pydantic import BaseModel

    from peftlab.recipe.schema import Recipe, section_model

    names: set[str] = set()

    def walk(model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            names.add(name)
            sub = section_model(field.annotation)
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub)

    walk(Recipe)
    assert set(ALIASES.values()) <= names, set(ALIASES.values()) - names


def test_a_dumped_recipe_loads_back_the_same(tmp_path):
    raw = {**MINIMAL, "adapter": {"r": 4, "layers": "top:2"}, "train": {"betas": [0.8, 0.9]}}
    r = load_recipe(write(tmp_path, raw), overrides=["distill.teacher=builtin:micro-llama"])
    out = tmp_path / "copy" / "peftlab_recipe.yaml"
    out.parent.mkdir()
    dump_recipe(r, out)
    assert load_recipe(out).to_dict() == r.to_dict()
    assert [p.name for p in out.parent.iterdir()] == ["peftlab_recipe.yaml"]  # no temporary left beside it


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(PeftlabError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(PeftlabError, match="it is a directory; pass the YAML file inside it"):
        load_recipe(tmp_path)
    with pytest.raises(PeftlabError, match="not valid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed"))
    with pytest.raises(PeftlabError, match="top level must be a mapping"):
        recipe_from_dict(["a"])  # type: ignore[arg-type]
