"""Generation: prompts encoded exactly as training encodes its held-out prompts (also through the chat
template an adapter carries), left-padded batches that decode as each prompt alone, stop tokens cut, greedy
decoding deterministic and sampling reproducible from its seed."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.data.config import DataConfig
from peftlab.data.pipeline import build_data
from peftlab.evaluation.generate import chat_prompt_ids, generate_ids, generate_text, stop_token_ids
from peftlab.model.builtin import build_tokenizer, resolve_builtin


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:micro-llama"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_quickstart_data(tmp_path_factory.mktemp("generate-data"), n_train=8, n_eval=4)


def _user_turns(path) -> list[str]:
    return [json.loads(line)["messages"][-2]["content"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("system", [None, "Answer with one word."])
def test_prompts_are_encoded_as_training_encodes_its_held_out_prompts(tok, data_dir, system):
    cfg = DataConfig(train=[str(data_dir / "train.jsonl")], eval=[str(data_dir / "eval.jsonl")], system_prompt=system,
                     eval_prompts=4)
    held_out = build_data(cfg, tok, seed=0).eval_prompts
    users = _user_turns(data_dir / "eval.jsonl")
    assert [chat_prompt_ids(tok, u, system) for u in users] == [p["prompt_ids"] for p in held_out]
    assert chat_prompt_ids(tok, users[0], system)[0] == tok.bos_token_id
    assert chat_prompt_ids(tok, users[0], system).count(tok.bos_token_id) == 1


def test_without_a_chat_template_the_prompt_is_the_text(tok):
    plain = build_tokenizer()
    plain.chat_template = None
    assert chat_prompt_ids(plain, "2 + 2 =") == [tok.bos_token_id] + tok("2 + 2 =", add_special_tokens=False)["input_ids"]


def test_left_padded_batches_decode_as_each_prompt_alone(tok, model):
    prompts = [chat_prompt_ids(tok, t) for t in ("What is 2 + 2?", "Name a colour, please", "hi")]
    assert len({len(p) for p in prompts}) == 3  # three widths: two rows are padded on the left
    alone = [generate_ids(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert generate_ids(model, tok, prompts, max_new_tokens=8, batch_size=3) == alone
    assert generate_ids(model, tok, prompts, max_new_tokens=8, batch_size=2) == alone
    assert all(len(a) == 8 for a in alone)


def test_greedy_is_deterministic_and_sampling_follows_its_seed(tok, model):
    prompts = [chat_prompt_ids(tok, "What is 3 + 4?")]
    model.train()
    greedy = generate_ids(model, tok, prompts, max_new_tokens=8)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert generate_ids(model, tok, prompts, max_new_tokens=8) == greedy
    kw = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_p": 1.0}
    sampled = generate_ids(model, tok, prompts, seed=3, **kw)
    assert generate_ids(model, tok, prompts, seed=3, **kw) == sampled
    assert generate_ids(model, tok, prompts, seed=4, **kw) != sampled
    assert generate_text(model, tok, ["What is 3 + 4?"], max_new_tokens=8) == [tok.decode(greedy[0],
                                                                                          skip_special_tokens=True)]


def test_stop_tokens_end_a_row_and_are_cut(tok, model, monkeypatch):
    assert stop_token_ids(tok, model) == [tok.eos_token_id]  # <|eot_id|> is the eos of the built-in tokenizer
    prompts = [chat_prompt_ids(tok, t) for t in ("What is 2 + 2?", "hi")]
    free = generate_ids(model, tok, prompts, max_new_tokens=8)
    stop = free[0][2]  # a token the first row generates third, and the second row never
    assert stop not in free[1] and stop not in free[0][:2]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, stop])
    assert stop_token_ids(tok, model) == sorted([tok.eos_token_id, stop])
    assert generate_ids(model, tok, prompts, max_new_tokens=8) == [free[0][:2], free[1]]


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory, data_dir):
    """A run that renders its data with data.template: chatml (the tokenizer's own template is Llama-3 style)."""
    from peftlab.recipe.parse import recipe_from_dict
    from peftlab.trainer.loop import train

    root = tmp_path_factory.mktemp("chatml")
    raw = tiny_recipe_dict(data_dir, root / "out", data={"template": "chatml", "max_seq_len": 160},
                           train={"max_steps": 1, "eval_at_start": False},
                           eval={"metric": "exact_match", "max_prompts": 2, "max_new_tokens": 2})
    raw["output"].update(report_to=["jsonl"], plot=False)
    recipe = recipe_from_dict(raw)
    train(recipe)
    return recipe, root / "out" / "adapter"


def test_the_training_template_travels_with_the_adapter(chatml_run, data_dir):
    """generate renders a prompt with the template the adapter was trained with, not the tokenizer's own."""
    from peftlab.data.templates import NAMED_TEMPLATES
    from peftlab.model.load import build_model
    from peftlab.recipe.from_adapter import recipe_for_adapter

    recipe, adapter = chatml_run
    saved = (adapter / "chat_template.jinja").read_text()
    assert saved == "{{ bos_token }}" + NAMED_TEMPLATES["chatml"]  # BOS: the tokenizer's convention, made explicit
    want = build_data(recipe.data, build_tokenizer(), seed=recipe.train.seed).eval_prompts[0]["prompt_ids"]
    user = _user_turns(data_dir / "eval.jsonl")[0]
    loaded = build_model(recipe_for_adapter(adapter), adapter_dir=adapter, trainable=False)
    assert loaded.tokenizer.chat_template == saved
    assert chat_prompt_ids(loaded.tokenizer, user) == want
    assert chat_prompt_ids(build_tokenizer(), user) != want  # the tokenizer's own template differs
    # a HF user of the saved template (apply_chat_template tokenizes without special tokens) gets the same ids
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    assert list(ids) == want
