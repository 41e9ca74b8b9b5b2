"""``peftlab eval | generate`` (peftlab/cli/inference.py): a trained adapter directory or its recipe evaluated
to the trainer's own figure, plain PEFT adapters and base models, stdout that holds only the product (messages
on stderr), and the refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.cli.main import main

pytestmark = pytest.mark.xdist_group("cli")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_quickstart_data(tmp_path_factory.mktemp("interop-data"), n_train=16, n_eval=6)


def test_eval_an_adapter_dir_and_a_recipe(trained, capsys, monkeypatch, tmp_path):
    recipe, adapter = trained
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


def test_generate_greedy_is_deterministic_and_sampling_is_seeded(trained, capsys):
    _, adapter = trained
    args = ["generate", "--adapter", str(adapter), "--prompt", "What is 2 + 2?", "--max-new-tokens", "6"]
    assert main(args) == 0 and main(args) == 0
    a, b = capsys.readouterr().out.splitlines()
    assert a == b
    sampled = args + ["--sample", "--temperature", "1.5", "--seed", "3"]
    assert main(sampled) == 0 and main(sampled) == 0
    c, d = capsys.readouterr().out.splitlines()
    assert c == d


def test_user_errors_exit_2_with_a_message(trained, tmp_path, capsys):
    _, adapter = trained
    assert main(["eval", str(tmp_path)]) == 2  # neither a peftlab nor a PEFT adapter directory
    assert "adapter_config.json is missing" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapter), "--set", "train.lr=-3", "--prompt", "x"]) == 2
    assert "train.lr" in capsys.readouterr().err


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, micro_dir):
    """A plain PEFT adapter (no peftlab files) with non-zero B, and the PEFT model it came from."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft")
    base = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32).eval()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                        task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(root / "adapter")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(micro_dir)
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert not (root / "adapter" / "peftlab_recipe.yaml").exists()
    return root / "adapter", pm.eval(), base


def _generate_reference(model, prompt: str, n: int) -> str:
    from peftlab.evaluation.generate import generate_text
    from peftlab.model.load import load_tokenizer

    return generate_text(model, load_tokenizer("builtin:micro-llama"), [prompt], max_new_tokens=n)[0]


def test_generate_with_a_plain_peft_adapter_and_with_a_base_model(peft_adapter, capsys):
    adapter, peft_model, base = peft_adapter
    assert main(["generate", "--adapter", str(adapter), "--prompt", "What is 2 + 3?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == _generate_reference(peft_model, "What is 2 + 3?", 8)
    assert main(["generate", "--model", "builtin:micro-llama", "--prompt", "What is 2 + 3?",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == _generate_reference(base, "What is 2 + 3?", 8)
    # --model replaces the base a PEFT adapter names
    broken = json.loads((adapter / "adapter_config.json").read_text())
    assert main(["generate", "--adapter", str(adapter), "--model", "builtin:micro-llama", "--prompt", "x",
                 "--max-new-tokens", "2"]) == 0
    assert broken["base_model_name_or_path"]  # unchanged file
    capsys.readouterr()


def test_eval_a_plain_peft_adapter_on_given_data(peft_adapter, data_dir, tmp_path, capsys):
    adapter, _, _ = peft_adapter
    assert main(["eval", str(adapter), "--data", str(data_dir / "eval.jsonl"), "--set", "eval.metric=loss"]) == 0
    out = capsys.readouterr()
    by_dir = json.loads(out.out)
    assert "evaluating adapter" in out.err
    # the same adapter as a recipe's adapter.init_from (no trained adapter in output.dir) gives the same loss
    raw = tiny_recipe_dict(data_dir, tmp_path / "out", quantization={"mode": "none"},
                           adapter={"init_from": str(adapter)}, eval={"metric": "loss"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["eval", str(recipe)]) == 0
    by_recipe = json.loads(capsys.readouterr().out)
    assert by_dir["eval_loss"] == pytest.approx(by_recipe["eval_loss"], rel=1e-6)
    assert main(["eval", str(recipe), "--base-only"]) == 0
    base_only = json.loads(capsys.readouterr().out)
    assert abs(base_only["eval_loss"] - by_dir["eval_loss"]) > 1e-3  # the adapter was really applied


def test_eval_and_generate_refuse_what_they_cannot_do(peft_adapter, data_dir, tmp_path, capsys):
    adapter, _, _ = peft_adapter
    assert main(["eval", str(adapter)]) == 2  # a PEFT adapter carries no data
    assert "--data FILE" in capsys.readouterr().err
    raw = tiny_recipe_dict(data_dir, tmp_path / "out", adapter={"init_from": str(adapter)})
    raw["data"].pop("eval")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["eval", str(recipe)]) == 2  # printed {} and exited 0 before
    assert "no eval data" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(adapter), "--prompt", ""]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x"]) == 2
    assert "--adapter DIR" in capsys.readouterr().err
    config = json.loads((adapter / "adapter_config.json").read_text())
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    (nameless / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    (nameless / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    assert main(["generate", "--adapter", str(nameless), "--prompt", "x"]) == 2
    assert "--model" in capsys.readouterr().err
