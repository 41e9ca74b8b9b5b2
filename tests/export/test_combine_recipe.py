"""Which training recipe a combination of adapters carries over (peftlab.export.combine.common_recipe): the first
input's, when every input has one and all agree on the base model, its dtype and its quantisation; a base named by a
local directory is the same base whether an adapter's recipe names it relative (older adapters) or absolute."""
from __future__ import annotations

import yaml

from peftlab.export.combine import common_recipe

NF4 = {"mode": "nf4", "double_quant": True}


def _recipe(path, name, dtype="float32", quantization=None):
    path.mkdir(parents=True)
    raw = {"model": {"name": name, "dtype": dtype}, "quantization": quantization or NF4}
    (path / "peftlab_recipe.yaml").write_text(yaml.safe_dump(raw))
    return path / "peftlab_recipe.yaml"


def test_the_same_base_carries_the_first_recipe(tmp_path):
    a, b = _recipe(tmp_path / "a", "builtin:tiny-llama"), _recipe(tmp_path / "b", "builtin:tiny-llama")
    assert common_recipe([a, b]) == a


def test_a_local_base_named_relative_and_absolute_is_one_base(tmp_path, monkeypatch):
    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    old = _recipe(tmp_path / "old", "models/base")  # an adapter trained before its recipe named it absolute
    new = _recipe(tmp_path / "new", str(tmp_path / "models" / "base"))
    assert common_recipe([old, new]) == old
    other = _recipe(tmp_path / "other", "meta-llama/Llama-3.1-8B")  # a hub id is compared as written
    assert common_recipe([old, other]) is None


def test_any_difference_or_a_missing_recipe_carries_none(tmp_path):
    a = _recipe(tmp_path / "a", "builtin:tiny-llama")
    assert common_recipe([a, _recipe(tmp_path / "b", "builtin:tiny-llama", dtype="bfloat16")]) is None
    assert common_recipe([a, _recipe(tmp_path / "c", "builtin:tiny-llama", quantization={"mode": "none"})]) is None
    assert common_recipe([a, tmp_path / "d" / "peftlab_recipe.yaml"]) is None
    assert common_recipe([]) is None
