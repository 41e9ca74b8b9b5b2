"""The ``dann:`` section: its defaults, the forms a target dataset may be given in, and the runs it cannot apply to
refused with one message naming the key and the fix (through recipe_from_dict, as the CLI reads a recipe)."""
from __future__ import annotations

import pytest

from peftlab.errors import PeftlabError
from peftlab.recipe.parse import recipe_from_dict

DATA = {"train": [{"path": "s.jsonl", "format": "classification"}]}


def _recipe(dann: dict | None = None, **sections):
    raw = {"task": "classification", "data": DATA, "dann": {"target": "t.jsonl", **(dann or {})}, **sections}
    return recipe_from_dict(raw)


def test_defaults_and_target_forms():
    r = _recipe()
    d = r.dann
    assert [s.path for s in d.target] == ["t.jsonl"] and d.target_eval == []
    assert (d.schedule, d.lambda_max, d.head.hidden_size, d.head.lr) == ("dann", 1.0, 64, None)
    r = _recipe({"target": [{"path": "a.jsonl"}, "b.jsonl"], "target_eval": {"path": "e.jsonl"},
                 "head": {"hidden_size": 8, "lr": 1e-2}, "schedule": "constant", "lambda_max": 0.3})
    assert [s.path for s in r.dann.target] == ["a.jsonl", "b.jsonl"] and r.dann.target_eval[0].path == "e.jsonl"
    assert recipe_from_dict({"task": "classification", "data": DATA}).dann is None


@pytest.mark.parametrize("raw, message", [
    ({"task": "causal_lm", "data": {"train": ["x.jsonl"]}}, "dann needs task: classification or regression"),
    ({"data": {**DATA, "streaming": True}}, "dann with data.streaming"),
    ({"deepspeed": "zero2.json"}, "dann with deepspeed is not supported"),
    ({"dann": {"target": []}}, "dann.target is empty"),
    ({"dann": {"target": [{"path": "t.jsonl", "format": "alpaca"}]}}, "target-domain data are classification rows"),
    ({"dann": {"target": "t.jsonl", "lambda_max": -1}}, "lambda_max"),
    ({"dann": {"target": "t.jsonl", "schedule": "linear"}}, "schedule"),
    ({"dann": {"target": "t.jsonl", "head": {"width": 3}}}, "width"),
])
def test_bad_combinations_are_refused_with_the_fix(raw, message):
    base = {"task": "classification", "data": DATA, "dann": {"target": "t.jsonl"}}
    with pytest.raises(PeftlabError, match=message):
        recipe_from_dict({**base, **raw})
