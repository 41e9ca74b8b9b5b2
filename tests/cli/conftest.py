"""A micro adapter trained once through ``peftlab train`` for the CLI tests of this folder."""
from __future__ import annotations

import pytest
import yaml
from helpers import make_quickstart_data, tiny_recipe_dict


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(recipe file, adapter dir) of a 3-step `peftlab train --quiet` run whose recipe uses relative
    paths, as users write them (relative to the recipe file)."""
    from peftlab.cli.main import main

    root = tmp_path_factory.mktemp("cli")
    data = make_quickstart_data(root / "data", n_train=32, n_eval=8)
    raw = tiny_recipe_dict(data, root / "out", train={"max_steps": 3, "eval_at_start": False},
                           eval={"metric": "exact_match", "max_prompts": 4, "max_new_tokens": 4, "show_samples": 1})
    raw["data"]["train"][0]["path"] = "data/train.jsonl"
    raw["data"]["eval"][0]["path"] = "data/eval.jsonl"
    raw["output"]["dir"] = "out"
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--quiet"]) == 0
    return recipe, root / "out" / "adapter"
