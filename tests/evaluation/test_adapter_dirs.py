"""Merged models carry the training chat template and every tokenizer file of the base (issue 16, items 6, 8).

These are tests of peftlab/export/merge.py kept here until they move to tests/export/test_merge.py (the CLI
tests of adapter directories are in tests/cli/test_inference.py, the template an adapter carries in
tests/evaluation/test_generate.py)."""
from __future__ import annotations

import json
import stat

import pytest
import torch
from helpers import make_quickstart_data, tiny_recipe_dict

pytestmark = pytest.mark.xdist_group("interop")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_quickstart_data(tmp_path_factory.mktemp("interop-data"), n_train=16, n_eval=6)


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
    train(recipe)
    return recipe, root / "out" / "adapter"


def _training_prompt_ids(recipe):
    from peftlab.data.pipeline import build_data
    from peftlab.model.load import load_tokenizer

    data = build_data(recipe.data, load_tokenizer("builtin:micro-llama"), seed=recipe.train.seed)
    return data.eval_prompts[0]["prompt_ids"], data


def test_merged_model_carries_the_template(chatml_run, data_dir, tmp_path):
    from transformers import AutoTokenizer

    from peftlab.export.merge import merge_adapter

    recipe, adapter = chatml_run
    out = tmp_path / "merged"
    merge_adapter(adapter, out, report_samples=0)
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
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", report_samples=0)
    for name, content in extras.items():
        assert (tmp_path / "merged" / name).read_bytes() == content, name
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "merged" / name).read_bytes() == (base / name).read_bytes(), name
