"""Frozen embeddings / head in 16 bits on fp32 CPU runs: only exact conversions, the same logits, loss and LoRA
gradients as the fp32 model, half the bytes; tied weights once; trainable or inexact weights untouched."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.model.frozen_weights import compact_frozen_weights
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss

FP32 = {"atol": 1e-6, "rtol": 1e-5}


def tiny(tied: bool = False, bf16_values: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).float()
    if bf16_values:  # what loading a bf16 checkpoint in fp32 gives
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    inject_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    return model


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def loss_grads_logits(model):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch(), normalizer=16.0, settings=LossSettings(backend="auto"))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        logits = model(input_ids=batch()["input_ids"]).logits
    return loss.detach(), grads, logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_same_results_in_half_the_bytes(tied):
    ref = tiny(tied)
    model = copy.deepcopy(ref)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    changed = compact_frozen_weights(model)
    assert changed == (["model.embed_tokens", "lm_head"])
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.weight.dtype == head.weight.dtype == torch.bfloat16 and not emb.weight.requires_grad
    assert (emb.weight is head.weight) == tied
    after = sum(p.numel() * p.element_size() for p in model.parameters())  # tied parameters counted once
    assert before - after == 300 * 32 * 2 * (1 if tied else 2)
    got, want = loss_grads_logits(model), loss_grads_logits(ref)
    torch.testing.assert_close(got[0], want[0], **FP32)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, **FP32)
    assert got[2].dtype == torch.float32
    torch.testing.assert_close(got[2], want[2], **FP32)
    with torch.no_grad():  # decoding (KV cache, model.dtype now reads bf16): the same greedy tokens
        prompt = batch()["input_ids"][:, :4]
        assert torch.equal(model.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                                 do_sample=False, pad_token_id=0),
                           ref.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                               do_sample=False, pad_token_id=0))


def test_inexact_or_trainable_weights_stay_fp32():
    model = tiny(bf16_values=False)  # random fp32 values: a 16-bit copy would lose bits
    assert compact_frozen_weights(model) == []
    model = tiny()
    model.lm_head.weight.requires_grad_(True)  # adapter.unfreeze: head
    assert compact_frozen_weights(model) == ["model.embed_tokens"]
    assert model.lm_head.weight.dtype == torch.float32


def test_build_model_stores_a_bf16_checkpoints_embeddings_in_bf16(tmp_path, micro_dir):
    from helpers import tiny_recipe_dict

    from peftlab.model.load import build_model
    from peftlab.recipe.schema import Recipe

    ckpt = tmp_path / "bf16"
    base = LlamaForCausalLM.from_pretrained(micro_dir, dtype=torch.float32).to(torch.bfloat16)
    base.save_pretrained(ckpt)
    for f in micro_dir.iterdir():  # the tokenizer files
        if "token" in f.name or f.suffix == ".jinja":
            (ckpt / f.name).write_bytes(f.read_bytes())
    raw = tiny_recipe_dict(tmp_path, tmp_path / "out", model={"name": str(ckpt)}, quantization={"mode": "none"},
                           train={"device": "cpu"})
    loaded = build_model(Recipe.model_validate(raw))
    assert loaded.dtype == torch.float32
    assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert next(loaded.model.model.layers.parameters()).dtype == torch.float32
    raw["model"]["frozen_16bit"] = False  # the switch: fp32 copies, as before
    assert build_model(Recipe.model_validate(raw)).model.get_input_embeddings().weight.dtype == torch.float32


def test_streaming_4bit_load_reads_the_embeddings_and_head_in_bf16(tmp_path, micro_dir):
    """The NF4 streaming loader puts a bf16 checkpoint's embeddings / head into the model in bf16 (never as fp32
    copies); the run's loss equals the fp32-copies run (frozen_16bit: false) exactly."""
    from helpers import tiny_recipe_dict

    from peftlab.model.load import build_model
    from peftlab.model.quantized_load import QuantSettings, load_quantized
    from peftlab.recipe.schema import Recipe

    ckpt = tmp_path / "bf16"
    LlamaForCausalLM.from_pretrained(micro_dir, dtype=torch.float32).to(torch.bfloat16).save_pretrained(ckpt)
    for f in micro_dir.iterdir():  # the tokenizer files
        if "token" in f.name or f.suffix == ".jinja":
            (ckpt / f.name).write_bytes(f.read_bytes())
    direct = load_quantized(ckpt, QuantSettings(), frozen_16bit=True)
    assert direct.model.embed_tokens.weight.dtype == direct.lm_head.weight.dtype == torch.bfloat16
    assert direct.model.norm.weight.dtype == torch.float32
    assert load_quantized(ckpt, QuantSettings()).lm_head.weight.dtype == torch.float32
    raw = tiny_recipe_dict(tmp_path, tmp_path / "out", model={"name": str(ckpt)}, train={"device": "cpu"})
    losses = []
    for frozen_16bit in (True, False):
        raw["model"]["frozen_16bit"] = frozen_16bit
        torch.manual_seed(0)  # the same LoRA A
        model = build_model(Recipe.model_validate(raw)).model
        assert model.lm_head.weight.dtype == (torch.bfloat16 if frozen_16bit else torch.float32)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.weight.normal_(0, 0.05)
        losses.append(causal_lm_loss(model, batch(), normalizer=16.0, settings=LossSettings(backend="auto")))
    assert torch.equal(losses[0], losses[1])
