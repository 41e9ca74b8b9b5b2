"""peftlab.export.source: which base model an adapter is merged into (``--base``, else the training recipe,
else the PEFT config), how training saw it (load dtype, 4-bit settings), which tokenizer travels with it, and
the base's module layout as transformers' 4-bit loader sees it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_quickstart_data, tiny_recipe_dict
from transformers import AutoModelForCausalLM

from peftlab.adapters.lora_inject import inject_lora
from peftlab.adapters.peft_format import save_adapter
from peftlab.errors import PeftlabError
from peftlab.export.source import BaseQuant, model_layout, resolve_source, tokenizer_dir
from peftlab.recipe.parse import dump_recipe, recipe_from_dict


def plain_adapter(micro_dir: Path, out: Path, base: str | None) -> Path:
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    inject_lora(model, r=2, alpha=2, target_modules=["q_proj"])
    save_adapter(model, out, base_model_name_or_path=base)
    return out


def test_a_peft_adapter_names_its_base_and_base_overrides_it(micro_dir, tmp_path):
    adapter = plain_adapter(micro_dir, tmp_path / "a", str(micro_dir))
    source = resolve_source(adapter)
    assert source.base_name == str(micro_dir) and source.base_dir == micro_dir
    assert source.recipe is None and source.quant is None and source.load_dtype is None
    assert tokenizer_dir(source) == micro_dir  # no tokenizer in the adapter, no recipe: the base's
    other = resolve_source(adapter, base="builtin:micro-llama")
    assert other.base_name == "builtin:micro-llama" and other.base_dir == micro_dir


def test_no_base_anywhere_is_refused_naming_the_flag(micro_dir, tmp_path):
    adapter = plain_adapter(micro_dir, tmp_path / "a", "")
    with pytest.raises(PeftlabError, match=r"no base model is named \(no peftlab_recipe.yaml, and adapter_config.json "
                                           r"has no base_model_name_or_path\); pass --base ID\|DIR"):
        resolve_source(adapter)


def test_the_training_recipe_says_how_the_base_was_loaded_and_quantised(micro_dir, tmp_path):
    data = make_quickstart_data(tmp_path / "data", n_train=2, n_eval=2)
    recipe = recipe_from_dict(tiny_recipe_dict(data, tmp_path / "run", model={"dtype": "bfloat16"},
                                               quantization={"mode": "fp4", "blocksize": 128, "double_quant": False}))
    adapter = plain_adapter(micro_dir, tmp_path / "a", "somebody/else")  # the recipe wins over the config
    dump_recipe(recipe, adapter / "peftlab_recipe.yaml")
    source = resolve_source(adapter)
    assert source.base_name == "builtin:micro-llama" and source.load_dtype == torch.bfloat16
    assert source.quant == BaseQuant("fp4", False, 128, "uint8", torch.bfloat16)
    (adapter / "tokenizer.json").write_text("{}")  # a tokenizer saved with the adapter travels with it
    assert tokenizer_dir(source) == adapter


def test_model_layout_lists_modules_in_model_order_and_the_4bit_targets(micro_dir):
    names, quantised = model_layout(micro_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_dir)
    assert names == [n for n, _ in model.named_modules() if n]
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantised == linear - {"lm_head.weight"}  # transformers keeps the output head dense
