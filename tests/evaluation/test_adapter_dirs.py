"""Adapters after training: plain PEFT adapters in eval / generate, base models in generate, the training chat
template carried by adapters and merged models, complete tokenizers in merged models (issue 16, items 4, 6, 8)."""
from __future__ import annotations

import copy
import json
import stat

import pytest
import torch
import yaml
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.cli.main import main

pytestmark = pytest.mark.xdist_group("interop")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_quickstart_data(tmp_path_factory.mktemp("interop-data"), n_train=16, n_eval=6)


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


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory, data_dir):
    """A run that renders its data with data.template: chatml (the tokenizer's own template is Llama-3 style)."""
    from peftlab.recipe.parse import recipe_from_dict
    from peftlab.trainer.loop import train

    root = tmp_path_factory.mktemp("chatml")
    raw = tiny_recipe_dict(data_dir, root / "out", data={"template": "chatml", "max_seq_len": 160},
                           train={"max_steps": 1, "eval_at_start": False},
                           eval={"metric": "exact_match", "max_prompts": 2, "max_new_tokens": 2})
    recipe = recipe_from_dict(raw)
    train(recipe, quiet=True)
    return recipe, root / "out" / "adapter"


def _training_prompt_ids(recipe):
    from peftlab.data import build_data
    from peftlab.model.load import load_tokenizer

    data = build_data(recipe.data, load_tokenizer("builtin:micro-llama"), seed=recipe.train.seed)
    return data.eval_prompts[0]["prompt_ids"], data


def test_the_training_template_travels_with_the_adapter(chatml_run, data_dir):
    from peftlab.data.templates import NAMED_TEMPLATES
    from peftlab.evaluation.generate import chat_prompt_ids
    from peftlab.model.load import build_model
    from peftlab.recipe.from_adapter import recipe_for_adapter

    recipe, adapter = chatml_run
    saved = (adapter / "chat_template.jinja").read_text()
    assert saved == "{{ bos_token }}" + NAMED_TEMPLATES["chatml"]  # BOS: the tokenizer's convention, made explicit
    want, _ = _training_prompt_ids(recipe)
    user = json.loads((data_dir / "eval.jsonl").read_text().splitlines()[0])["messages"][-2]["content"]
    loaded = build_model(recipe_for_adapter(adapter), adapter_dir=adapter, trainable=False)
    assert loaded.tokenizer.chat_template == saved
    assert chat_prompt_ids(loaded.tokenizer, user) == want  # generate renders prompts exactly as training did
    # a HF user of the saved template (apply_chat_template tokenizes without special tokens) gets the same ids
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    assert list(ids) == want


def test_merged_model_carries_the_template(chatml_run, data_dir, tmp_path):
    from transformers import AutoTokenizer

    from peftlab.export.merge import merge_adapter

    recipe, adapter = chatml_run
    out = tmp_path / "merged"
    merge_adapter(adapter, out, report_samples=0, log=lambda *a: None)
    saved = (adapter / "chat_template.jinja").read_text()
    assert (out / "chat_template.jinja").read_text() == saved
    assert AutoTokenizer.from_pretrained(out).chat_template == saved
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode & 0o055 == 0o055, oct(mode)  # readable by group and others (umask 022), not mkdtemp's 0700
    # a user of the merged model renders prompts exactly as training did
    want, _ = _training_prompt_ids(recipe)
    user = json.loads((data_dir / "eval.jsonl").read_text().splitlines()[0])["messages"][-2]["content"]
    tok = AutoTokenizer.from_pretrained(out)
    assert list(tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)) == want


def test_merge_copies_every_tokenizer_file_of_the_base(tmp_path, micro_dir):
    import shutil

    from peftlab.adapters.lora_inject import inject_lora
    from peftlab.adapters.peft_format import save_adapter
    from peftlab.export.merge import merge_adapter
    from peftlab.model.load import load_base_model

    base = tmp_path / "base"
    shutil.copytree(micro_dir, base)
    extras = {"tokenizer.model": b"\x0a\x03sp-model-bytes", "special_tokens_map.json": b'{"bos_token": "<|begin_of_text|>"}',
              "added_tokens.json": b"{}"}
    for name, content in extras.items():
        (base / name).write_bytes(content)
    model = load_base_model(str(base), dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", report_samples=0, log=lambda *a: None)
    for name, content in extras.items():
        assert (tmp_path / "merged" / name).read_bytes() == content, name
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "merged" / name).read_bytes() == (base / name).read_bytes(), name
