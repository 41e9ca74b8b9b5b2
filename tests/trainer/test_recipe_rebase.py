"""Recipe.with_local_paths_absolute: a copy of a recipe written to another folder (the adapter's peftlab_recipe.yaml,
a sweep's best_recipe.yaml) names the same files as the recipe did, for every path-valued key of the schema, read
back from elsewhere through peftlab's own resolvers; hub ids, built-ins and missing data/model paths stay as written.
The schema walk makes a string key added later fail here until it is classified (path or not)."""
from __future__ import annotations

import json
import typing
from pathlib import Path
from types import SimpleNamespace

import torch
from pydantic import BaseModel

from peftlab.checkpoint.resume import checkpoint_to_resume
from peftlab.data.sources import Source
from peftlab.model.load import resolve_model_path
from peftlab.objectives.teacher import default_cache_dir
from peftlab.recipe.parse import recipe_from_dict
from peftlab.recipe.schema import Recipe, section_model
from peftlab.trainer import setup

# Every path-valued key and how peftlab opens it: "recipe" = relative to the recipe's folder (Recipe.resolve_path,
# the data sources), "loaded" = opened as written by the model/tokenizer loaders (relative: the working directory).
PATH_KEYS = {
    "model.name": "loaded", "model.tokenizer": "loaded",
    "adapter.init_from": "recipe",
    "data.train[].path": "recipe", "data.eval[].path": "recipe",
    "output.dir": "recipe", "deepspeed": "recipe", "resume": "recipe",
    "distill.teacher.name": "loaded", "distill.teacher.tokenizer": "loaded", "distill.teacher.adapter": "recipe",
    "distill.cache_dir": "recipe",
    "dann.target[].path": "recipe", "dann.target_eval[].path": "recipe",
}
# String keys that are not paths (checkpoint.dir is relative to output.dir by definition and must stay so).
NOT_PATHS = {
    "model.revision", "adapter.target_modules", "adapter.layers", "adapter.unfreeze", "data.template",
    "data.system_prompt", "checkpoint.dir", "distill.teacher.revision", "train.early_stopping.metric",
    *(f"{lst}[].{k}" for lst in ("data.train", "data.eval", "dann.target", "dann.target_eval")
      for k in ("split", "fields", "name")),
}


def _has_str(annotation) -> bool:
    return annotation is str or any(_has_str(a) for a in typing.get_args(annotation))


def _string_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        if field.exclude:  # base_dir, data.preference: never written
            continue
        sub = section_model(field.annotation)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys |= _string_keys(sub, f"{prefix}{name}{'[]' if 'list[' in str(field.annotation) else ''}.")
        elif _has_str(field.annotation):
            keys.add(prefix + name)
    return keys


def test_every_string_key_of_the_schema_is_classified():
    found = _string_keys(Recipe)
    assert found == set(PATH_KEYS) | NOT_PATHS, (
        f"unclassified: {sorted(found - set(PATH_KEYS) - NOT_PATHS)}; stale: {sorted((set(PATH_KEYS) | NOT_PATHS) - found)}")


def _values(recipe: Recipe, dotted: str) -> list[str]:
    """The values of ``dotted`` (``[]``: every item of a list) that are set."""
    nodes = [recipe]
    for part in dotted.split("."):
        many = part.endswith("[]")
        nodes = [getattr(n, part.removesuffix("[]")) for n in nodes if n is not None]
        if many:
            nodes = [item for lst in nodes for item in lst]
    return [n for n in nodes if n is not None]


def _where(recipe: Recipe, dotted: str) -> list[Path]:
    """Where peftlab opens each value of ``dotted``, as an absolute path (under the current working directory)."""
    if PATH_KEYS[dotted] == "loaded":
        return [Path(v).expanduser().resolve() for v in _values(recipe, dotted)]
    return [recipe.resolve_path(v).resolve() for v in _values(recipe, dotted)]


def _tree(root: Path) -> dict[str, Path]:
    """Files of two recipes: one causal LM with distillation, deepspeed, init_from and resume, one classification
    run with DANN; models and tokenizers under ``root/work`` (the working directory when the run started)."""
    rec, work = root / "rec", root / "work"
    for f in ("data/train.jsonl", "data/eval.jsonl", "data/cls.jsonl", "data/target.jsonl", "data/target_eval.jsonl"):
        (rec / f).parent.mkdir(parents=True, exist_ok=True)
        (rec / f).write_text(json.dumps({"text": "a", "label": "x"}) + "\n")
    for d in ("adapters/init", "adapters/teacher", "runs/a/checkpoints/step-00000002", "ds"):
        (rec / d).mkdir(parents=True, exist_ok=True)
    (rec / "ds/zero2.json").write_text("{}")
    for d in ("models/student", "models/teacher"):
        (work / d).mkdir(parents=True)
        (work / d / "config.json").write_text("{}")
    (work / "tokenizers/tok").mkdir(parents=True)
    (work / "tokenizers/tok/tokenizer.json").write_text("{}")
    return {"rec": rec, "work": work}


def _recipes(rec: Path) -> list[Recipe]:
    lm = {"model": {"name": "models/student", "tokenizer": "tokenizers/tok"},
          "adapter": {"init_from": "adapters/init"},
          "data": {"train": "data/train.jsonl", "eval": ["data/eval.jsonl"]},
          "output": {"dir": "runs/a"}, "deepspeed": "ds/zero2.json", "resume": "runs/a/checkpoints/step-00000002",
          "distill": {"teacher": {"name": "models/teacher", "tokenizer": "tokenizers/tok", "adapter": "adapters/teacher"},
                      "mode": "offline", "cache_dir": "cache/teacher"}}
    cls = {"task": "classification", "model": {"name": "models/student"},
           "data": {"train": [{"path": "data/cls.jsonl", "format": "classification"}]},
           "output": {"dir": "runs/b"},
           "dann": {"target": "data/target.jsonl", "target_eval": ["data/target_eval.jsonl"]}}
    return [recipe_from_dict(lm, base_dir=rec), recipe_from_dict(cls, base_dir=rec)]


def test_a_rebased_recipe_names_the_same_files_from_another_folder(tmp_path, monkeypatch):
    dirs = _tree(tmp_path)
    monkeypatch.chdir(dirs["work"])
    recipes = _recipes(dirs["rec"])
    covered = set()
    for recipe in recipes:
        before = {k: _where(recipe, k) for k in PATH_KEYS}
        copy = recipe.with_local_paths_absolute()
        assert recipe.to_dict() == _recipes(dirs["rec"])[recipes.index(recipe)].to_dict()  # the original: as it was
        # written elsewhere and read back from there, by a process in yet another working directory
        moved = recipe_from_dict(copy.to_dict(), base_dir=tmp_path / "elsewhere")
        monkeypatch.chdir(tmp_path)
        for key in PATH_KEYS:
            assert _where(moved, key) == before[key], key
            covered |= {key} if before[key] else set()
        # peftlab's own resolvers agree
        assert moved.output_dir == (dirs["rec"] / recipe.output.dir).resolve()
        train = [Source(s, Path(moved.base_dir)).path for s in moved.data.train]
        assert train == [Source(s, dirs["rec"]).path.resolve() for s in recipe.data.train]
        if recipe.distill is not None:
            assert default_cache_dir(moved) == (dirs["rec"] / "cache/teacher").resolve()
            assert checkpoint_to_resume(moved, moved.output_dir / "checkpoints") == (
                dirs["rec"] / "runs/a/checkpoints/step-00000002").resolve()
            assert Path(resolve_model_path(moved.model.name)) == dirs["work"] / "models/student"
        monkeypatch.chdir(dirs["work"])
    assert covered == set(PATH_KEYS)  # each key was set (and so checked) in one of the two recipes


def test_hub_ids_builtins_and_missing_data_or_models_stay_as_written(tmp_path, monkeypatch):
    dirs = _tree(tmp_path)
    monkeypatch.chdir(dirs["work"])
    lm = {"model": {"name": "models/student"},
          "data": {"train": "data/train.jsonl", "eval": ["data/eval.jsonl", "tatsu-lab/alpaca", "data/missing.jsonl"]},
          "distill": {"teacher": {"name": "models/not-there", "tokenizer": "org/teacher-tok"}}}
    cls = {"task": "classification", "model": {"name": "builtin:micro-llama"}, "data": {"train": "data/cls.jsonl"},
           "dann": {"target": "org/target-set", "target_eval": ["data/target_eval.jsonl", "data/missing.jsonl"]}}
    lm, cls = (recipe_from_dict(r, base_dir=dirs["rec"]).with_local_paths_absolute() for r in (lm, cls))
    assert [s.path for s in lm.data.eval] == [str((dirs["rec"] / "data/eval.jsonl").resolve()), "tatsu-lab/alpaca",
                                              "data/missing.jsonl"]
    assert (lm.distill.teacher.name, lm.distill.teacher.tokenizer) == ("models/not-there", "org/teacher-tok")
    assert lm.model.name == str(dirs["work"] / "models/student")
    assert [s.path for s in cls.dann.target] == ["org/target-set"]
    assert [s.path for s in cls.dann.target_eval] == [str((dirs["rec"] / "data/target_eval.jsonl").resolve()),
                                                      "data/missing.jsonl"]
    assert cls.model.name == "builtin:micro-llama" and cls.model.tokenizer is None
    raw = {"model": {"name": "meta-llama/Llama-3.1-8B", "tokenizer": "models/nowhere"}, "data": {"train": "d.jsonl"},
           "resume": "auto", "checkpoint": {"dir": "ckpt"}}
    copy = recipe_from_dict(raw, base_dir=dirs["rec"]).with_local_paths_absolute()
    assert (copy.model.name, copy.model.tokenizer, copy.data.train[0].path) == (
        "meta-llama/Llama-3.1-8B", "models/nowhere", "d.jsonl")
    assert copy.resume == "auto" and copy.checkpoint.dir == "ckpt"  # relative to output.dir by definition
    # an output folder does not exist before the run: it is still the recipe folder's, not the copy's
    assert copy.output.dir == str((dirs["rec"] / "runs/peftlab").resolve())


def test_the_adapters_recipe_is_the_rebased_recipe_with_the_dtype_it_ran_in(tmp_path, monkeypatch):
    dirs = _tree(tmp_path)
    monkeypatch.chdir(dirs["work"])
    recipe = _recipes(dirs["rec"])[0]
    resolved = setup.resolved_recipe(recipe, SimpleNamespace(dtype=torch.bfloat16))
    want = recipe.with_local_paths_absolute().to_dict()
    want["model"]["dtype"] = "bfloat16"
    assert resolved.to_dict() == want
    assert resolved.model.name == str(dirs["work"] / "models/student")
    assert resolved.distill.teacher.adapter == str(dirs["rec"] / "adapters/teacher")
