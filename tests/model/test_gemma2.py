"""Gemma-2: an attention backend it supports, and its logit soft-capping applied once (issue 16, item 7)."""
from __future__ import annotations

import logging

import pytest
import torch

pytestmark = pytest.mark.xdist_group("gemma2")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny random Gemma-2 (soft-capped attention and final logits) with the built-in tokenizer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from peftlab.model.load import load_tokenizer

    tok = load_tokenizer("builtin:micro-llama")
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       final_logit_softcapping=3.0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # logits big enough that a second cap would change the loss a lot
        model.model.embed_tokens.weight.mul_(40.0)
    out = tmp_path_factory.mktemp("gemma2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _recipe(gemma_dir, kernels: str, **loss):
    from peftlab.recipe.parse import recipe_from_dict

    return recipe_from_dict({"model": {"name": str(gemma_dir)}, "quantization": {"mode": "none"},
                             "adapter": {"r": 4, "dropout": 0.0}, "kernels": kernels,
                             "data": {"train": [{"path": "unused.jsonl"}]}, "train": {"device": "cpu", "loss": loss}})


@pytest.mark.parametrize("kernels", ["off", "torch"])
def test_gemma2_loads_and_its_loss_equals_transformers(gemma_dir, kernels, caplog):
    from peftlab.model.load import build_model
    from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss, count_targets

    recipe = _recipe(gemma_dir, kernels)
    assert recipe.model.attn_implementation == "sdpa"  # the default, which transformers refuses for Gemma-2
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        loaded = build_model(recipe, trainable=False)
    assert loaded.model.config._attn_implementation == "eager"
    assert "model.attn_implementation" in caplog.text and "eager" in caplog.text
    model = loaded.model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels).loss
        settings = LossSettings.from_recipe(recipe, model)
        assert settings.softcap == 3.0
        got = causal_lm_loss(model, batch, normalizer=count_targets(batch), settings=settings)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_a_second_softcap_is_refused(gemma_dir):
    from peftlab.errors import PeftlabError
    from peftlab.model.load import build_model
    from peftlab.objectives.causal_lm import LossSettings

    recipe = _recipe(gemma_dir, "torch", softcap=30.0)
    loaded = build_model(recipe, trainable=False)
    with pytest.raises(PeftlabError, match="train.loss.softcap"):
        LossSettings.from_recipe(recipe, loaded.model)


def test_an_unsupported_attention_backend_is_refused_naming_the_key():
    from transformers import Gemma2Config

    from peftlab.errors import PeftlabError
    from peftlab.model.load import attention_implementation

    cfg = Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    assert attention_implementation(cfg, "eager") == "eager"
    from transformers import Gemma2ForCausalLM

    if not getattr(Gemma2ForCausalLM, "_supports_flash_attn", True):
        with pytest.raises(PeftlabError, match="model.attn_implementation"):
            attention_implementation(cfg, "flash_attention_2")
