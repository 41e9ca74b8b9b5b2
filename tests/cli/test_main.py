"""The peftlab command line on a freshly trained micro adapter: train, eval, generate, data."""
from __future__ import annotations

import json

import pytest
import yaml
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.cli.main import main

pytestmark = pytest.mark.xdist_group("cli")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_quickstart_data(root / "data", n_train=32, n_eval=8)
    raw = tiny_recipe_dict(data, root / "out", train={"max_steps": 3, "eval_at_start": False},
                           eval={"metric": "exact_match", "max_prompts": 4, "max_new_tokens": 4, "show_samples": 1})
    # relative paths, as users write them: relative to the recipe file
    raw["data"]["train"][0]["path"] = "data/train.jsonl"
    raw["data"]["eval"][0]["path"] = "data/eval.jsonl"
    raw["output"]["dir"] = "out"
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--quiet"]) == 0
    return recipe, root / "out" / "adapter"


def test_eval_an_adapter_dir_and_a_recipe(run, capsys, monkeypatch, tmp_path):
    recipe, adapter = run
    monkeypatch.chdir(tmp_path)  # the adapter's recipe copy must not depend on the working directory
    stored = yaml.safe_load((adapter / "peftlab_recipe.yaml").read_text())
    assert stored["model"]["dtype"] == "float32"  # `auto` resolved to what training used
    assert main(["eval", str(adapter)]) == 0
    by_dir = json.loads(capsys.readouterr().out)
    assert main(["eval", str(recipe)]) == 0
    by_recipe = json.loads(capsys.readouterr().out)
    assert by_dir["eval_loss"] == by_recipe["eval_loss"] > 0
    assert 0.0 <= by_dir["exact_match"] <= 1.0
    summary = json.loads((adapter.parent / "summary.json").read_text())
    assert by_dir["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], rel=1e-6)


def test_generate_greedy_is_deterministic_and_sampling_is_seeded(run, capsys):
    _, adapter = run
    args = ["generate", "--adapter", str(adapter), "--prompt", "What is 2 + 2?", "--max-new-tokens", "6"]
    assert main(args) == 0 and main(args) == 0
    a, b = capsys.readouterr().out.splitlines()
    assert a == b
    sampled = args + ["--sample", "--temperature", "1.5", "--seed", "3"]
    assert main(sampled) == 0 and main(sampled) == 0
    c, d = capsys.readouterr().out.splitlines()
    assert c == d


def test_data_preview_marks_trained_spans(run, capsys):
    recipe, _ = run
    assert main(["data", str(recipe), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "]]" in out and "trained" in out.lower()


def test_user_errors_exit_2_with_a_message(run, tmp_path, capsys):
    _, adapter = run
    assert main(["eval", str(tmp_path)]) == 2  # neither a peftlab nor a PEFT adapter directory
    assert "adapter_config.json is missing" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapter), "--set", "train.lr=-3", "--prompt", "x"]) == 2
    assert "train.lr" in capsys.readouterr().err
