"""peftlab.export.merge: the merged model reproduces the adapter model; streaming equals the in-memory merge.

Ground truth: the adapter model as training built it (``build_model(recipe, adapter_dir=...)``: a
dense or NF4 base plus peftlab's LoRA layers, which match PEFT's — see test_lora.py), and
``peftlab.adapters.lora_inject.merge_lora`` (the in-memory merge) for the shard-by-shard path.
"""
from __future__ import annotations

import copy
import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from helpers import make_quickstart_data, tiny_recipe_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.adapters.chat_template import save_chat_template, training_template
from peftlab.adapters.lora_inject import inject_lora, lora_modules, merge_lora
from peftlab.adapters.peft_format import load_adapter, save_adapter
from peftlab.cli.main import main
from peftlab.data.pipeline import build_data
from peftlab.errors import PeftlabError
from peftlab.export.merge import merge_adapter, parse_size
from peftlab.model.builtin import CHAT_TEMPLATE, resolve_builtin
from peftlab.model.load import build_model, load_base_model
from peftlab.recipe.parse import dump_recipe, recipe_from_dict

VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}




@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("qs-data"), n_train=8, n_eval=6)


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """B (and the DoRA magnitude) made non-zero so that every merged weight really changes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sorted(lora_modules(model).items()):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
            if m.lora_magnitude_vector is not None:
                m.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(m.lora_magnitude_vector.shape, generator=g))


def make_trained_adapter(data_dir: Path, out: Path, *, quant: str, variant: str) -> Path:
    """An adapter dir exactly as `peftlab train` writes it (PEFT files + peftlab_recipe.yaml), without the
    training loop: the recipe's model with LoRA injected and randomised."""
    raw = tiny_recipe_dict(data_dir, out / "run", quantization={"mode": quant}, adapter=VARIANTS[variant],
                           model={"dtype": "float32"}, train={"device": "cpu"})
    recipe = recipe_from_dict(raw)
    torch.manual_seed(0)
    loaded = build_model(recipe, trainable=False)
    randomise(loaded.model)
    adapter = out / "adapter"
    save_adapter(loaded.model, adapter, base_model_name_or_path=recipe.model.name)
    dump_recipe(recipe, adapter / "peftlab_recipe.yaml")
    return adapter


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_model_reproduces_adapter_model(data_dir, tmp_path, quant, variant):
    adapter = make_trained_adapter(data_dir, tmp_path, quant=quant, variant=variant)
    result = merge_adapter(adapter, tmp_path / "merged", report_samples=4)
    atol = 1e-5 if quant == "none" else 1e-4
    recipe = recipe_from_dict(tiny_recipe_dict(data_dir, tmp_path / "run", quantization={"mode": quant},
                                               adapter=VARIANTS[variant], model={"dtype": "float32"}))
    expected = logits(build_model(recipe, adapter_dir=adapter, trainable=False).model, IDS)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    got = logits(merged, IDS)
    base = AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:micro-llama"), dtype=torch.float32)
    assert (expected - logits(base, IDS)).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    # the fidelity report measured the same thing on the recipe's held-out data
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report == result.report
    assert report["samples"] == 4 and report["samples_source"].startswith("training recipe eval data")
    assert report["max_abs_logit_diff"] <= atol and report["top1_agreement"] == 1.0
    assert report["perplexity_merged"] == pytest.approx(report["perplexity_adapter"], rel=1e-5)
    assert report["adapter_model"] == ("dense" if quant == "none" else "4-bit NF4")


def test_merged_dir_is_a_standard_hf_model(data_dir, tmp_path, micro_dir):
    adapter = make_trained_adapter(data_dir, tmp_path, quant="nf4", variant="lora")
    result = merge_adapter(adapter, tmp_path / "merged", dtype="bf16", max_shard_size="150KB", report_samples=2)
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) == len(result.shards) > 1 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    base_keys = set(load_file(str(micro_dir / "model.safetensors")))
    assert set(index["weight_map"]) == base_keys
    assert all(t.dtype == torch.bfloat16 for s in shards for t in load_file(str(s)).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "generation_config.json").is_file() and (out / "peftlab_recipe.yaml").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok("a b").input_ids == AutoTokenizer.from_pretrained(micro_dir)("a b").input_ids
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    # bf16 output: the report still compares against the fp32 adapter model, with bf16-sized differences
    assert 0 < result.report["max_abs_logit_diff"] < 0.5


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_shard_by_shard_merge_equals_in_memory_merge(micro_dir, tmp_path, variant):
    """A base saved in several shards, merged by streaming, equals ``merge_lora`` bit for bit; the
    writer never held more than one output shard (plus one tensor), far less than the model."""
    base = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    sharded = tmp_path / "base"
    base.save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(micro_dir).save_pretrained(sharded)
    n_in = len(list(sharded.glob("*.safetensors")))
    assert n_in > 3
    model = copy.deepcopy(base)
    inject_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "down_proj", "lm_head"],
                use_dora=variant == "dora")
    randomise(model, seed=3)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(sharded))  # a PEFT adapter: no recipe
    max_shard = parse_size("120KB")
    result = merge_adapter(tmp_path / "adapter", tmp_path / "merged", max_shard_size=max_shard, report_samples=2)
    expected = merge_lora(model).state_dict()
    got: dict[str, torch.Tensor] = {}
    for shard in result.shards:
        got.update(load_file(str(shard)))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    largest = max(v.numel() * v.element_size() for v in expected.values())
    assert len(result.shards) > 3
    assert result.peak_buffered_bytes <= max_shard + largest < result.total_bytes / 3
    assert result.report["samples_source"] == "built-in prompts"
    assert result.report["max_abs_logit_diff"] <= 1e-5


def test_trained_precision_is_the_4bit_weight_training_saw(data_dir, tmp_path):
    """NF4 round trip of the checkpoint = the dequantised Linear4bit weight: the streamed merge equals
    merge_lora on the 4-bit adapter model bit for bit; `original` merges into the unquantised weights."""
    adapter = make_trained_adapter(data_dir, tmp_path, quant="nf4", variant="dora")
    recipe = recipe_from_dict(tiny_recipe_dict(data_dir, tmp_path / "run", adapter={"dora": True},
                                               model={"dtype": "float32"}))
    expected = merge_lora(build_model(recipe, adapter_dir=adapter, trainable=False).model,
                          dtype=torch.float32).state_dict()
    trained = merge_adapter(adapter, tmp_path / "trained", report_samples=0)
    original = merge_adapter(adapter, tmp_path / "original", base_precision="original", report_samples=2)
    assert trained.report is None and not (tmp_path / "trained" / "merge_report.json").exists()
    got_t, got_o = (load_file(str(r.shards[0])) for r in (trained, original))
    assert sorted(got_t) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got_t[key], value), key
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got_o[q], got_t[q])
    # the adapter was "trained" on NF4 weights: merging into the original ones moves the logits visibly
    assert original.report["base_precision"] == "original" and original.report["max_abs_logit_diff"] > 1e-3


def test_peft_adapter_without_recipe_and_base_override(micro_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    model = copy.deepcopy(base)
    inject_lora(model, r=4, alpha=4, target_modules=["v_proj"])
    randomise(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="nobody/missing-model")
    with pytest.raises(PeftlabError, match=r"could not get base model 'nobody/missing-model'.*--base"):
        merge_adapter(tmp_path / "adapter", tmp_path / "m", report_samples=0)
    merge_adapter(tmp_path / "adapter", tmp_path / "m", base="builtin:micro-llama", report_samples=0)
    ref = copy.deepcopy(base)
    load_adapter(ref, tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    torch.testing.assert_close(logits(merged, IDS), logits(ref, IDS), rtol=0, atol=1e-5)
    with pytest.raises(PeftlabError, match="exists and is not empty.*--overwrite"):
        merge_adapter(tmp_path / "adapter", tmp_path / "m", base="builtin:micro-llama")
    assert (tmp_path / "m" / "config.json").is_file()  # the old result is untouched


def test_cli_merge_and_errors(data_dir, tmp_path, capsys):
    adapter = make_trained_adapter(data_dir, tmp_path, quant="none", variant="rslora")
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32",
                 "--report-samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "fidelity (2 samples" in printed and "max |Δlogit|" in printed
    assert json.loads((out / "merge_report.json").read_text())["max_abs_logit_diff"] <= 1e-5
    # push to the hub without a network: a clear error, the merged model stays, the card is written
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m2"), "--report-samples", "0",
                 "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub me/model: no network (HF_HUB_OFFLINE=1)" in err and str(tmp_path / "m2") in err
    assert (tmp_path / "m2" / "config.json").is_file()
    assert "base_model: builtin:micro-llama" in (tmp_path / "m2" / "README.md").read_text()
    assert main(["merge", "--out", str(tmp_path / "x")]) == 2
    assert "pass --adapter DIR" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    assert "expected a size such as 2GB" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_merged_model_carries_the_training_template_and_renders_prompts_as_training_did(data_dir, tmp_path):
    """A run that rendered its data with data.template: chatml (the tokenizer's own template is Llama-3 style):
    the merged model's tokenizer renders a prompt to exactly the ids training held out for it; the directory
    is readable by group and others (umask 022), not mkdtemp's 0700."""
    recipe = recipe_from_dict(tiny_recipe_dict(data_dir, tmp_path / "run", quantization={"mode": "none"},
                                               data={"template": "chatml", "max_seq_len": 160}))
    loaded = build_model(recipe, trainable=False)
    adapter = tmp_path / "adapter"
    save_adapter(loaded.model, adapter, base_model_name_or_path=recipe.model.name)
    dump_recipe(recipe, adapter / "peftlab_recipe.yaml")
    save_chat_template(adapter, training_template(loaded.tokenizer, "chatml"))  # as the trainer saves it
    out = tmp_path / "merged"
    merge_adapter(adapter, out, report_samples=0)
    saved = (adapter / "chat_template.jinja").read_text()
    assert (out / "chat_template.jinja").read_text() == saved
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == saved
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode & 0o055 == 0o055, oct(mode)
    data = build_data(recipe.data, loaded.tokenizer, seed=recipe.train.seed)
    user = json.loads((data_dir / "eval.jsonl").read_text().splitlines()[0])["messages"][-2]["content"]
    assert list(tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)) == data.eval_prompts[0]["prompt_ids"]


def test_merge_copies_every_tokenizer_file_of_the_base(tmp_path, micro_dir):
    base = tmp_path / "base"
    shutil.copytree(micro_dir, base)
    extras = {"tokenizer.model": b"\x0a\x03sp-model-bytes", "added_tokens.json": b"{}",
              "special_tokens_map.json": b'{"bos_token": "<|begin_of_text|>"}'}
    for name, content in extras.items():
        (base / name).write_bytes(content)
    model = load_base_model(str(base), dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", report_samples=0)
    for name, content in extras.items():
        assert (tmp_path / "merged" / name).read_bytes() == content, name
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "merged" / name).read_bytes() == (base / name).read_bytes(), name

