"""Fused attention/MLP blocks on model instances: loss and every LoRA gradient equal PEFT's (NF4 and dense tiny
Llama), per-module fallback for bias / dropout / GeGLU logged once with the names, other families, removal."""
from __future__ import annotations

import logging

import pytest
import torch
from peft_parity import make_pair, our_params, peft_params, quantize_linears_4bit
from torch import nn
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from peftlab.adapters.fused_blocks import apply_fused_blocks, remove_fused_blocks
from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.adapters.lora_layer import LoraLinear
from peftlab.model.load import enable_gradient_checkpointing

# in_features multiples of the NF4 blocksize (64): bitsandbytes 0.50 CPU dequant is wrong otherwise
# (kernels/nf4.py, bnb_cpu_dequant_is_exact), and PEFT runs on it
SMALL = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
FP32 = {"atol": 1e-5, "rtol": 5e-4}


def tiny(config_cls=LlamaConfig, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = config_cls(**{**SMALL, **kw})
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def ids() -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))


def loss_and_grads(model: nn.Module, params: dict[str, torch.Tensor], seed: int = 5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout draws for every run
    x = ids()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in params.items()}


def lora_calls(model: nn.Module) -> list[int]:
    """A counter of per-module LoraLinear forwards (the fused path runs none of them)."""
    calls = [0]
    for m in lora_modules(model).values():
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("quant", [True, False], ids=["nf4", "dense"])
def test_loss_and_every_lora_gradient_equal_peft(quant):
    base = tiny()
    if quant:
        base = quantize_linears_4bit(base)
    pm, ours = make_pair(base, "lora", r=4, alpha=8)
    pm.train(), ours.train()
    ref_loss, ref = loss_and_grads(pm, peft_params(pm))
    unfused_loss, _ = loss_and_grads(ours, our_params(ours))
    with torch.no_grad():
        unfused_tokens = ours.eval().generate(ids()[:, :5], max_new_tokens=3, do_sample=False)
    assert apply_fused_blocks(ours) == {}
    with torch.no_grad():  # decoding with a KV cache: the same greedy tokens
        assert torch.equal(ours.generate(ids()[:, :5], max_new_tokens=3, do_sample=False), unfused_tokens)
    enable_gradient_checkpointing(ours.train())  # non-reentrant: the block Functions run again in backward
    calls = lora_calls(ours)
    loss, got = loss_and_grads(ours, our_params(ours))
    assert calls[0] == 0  # every q/k/v/o/gate/up/down ran inside the block Functions (recompute included)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    torch.testing.assert_close(loss, unfused_loss, **FP32)
    assert sorted(got) == sorted(ref) and len(got) == 2 * 7 * 2
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **FP32, msg=lambda m, k=k: f"{k}: {m}")
    remove_fused_blocks(ours)
    loss_and_grads(ours, our_params(ours))
    assert calls[0] >= 2 * 7  # the class forwards are back (the checkpointed backward reruns most of them)


def test_bias_and_dropout_fall_back_per_module_logged_once_with_names(caplog):
    model = tiny(attention_bias=True)
    inject_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    lora_modules(model)["model.layers.1.mlp.down_proj"].lora_dropout = nn.Dropout(0.1)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref_loss, ref = loss_and_grads(model, params)
    with caplog.at_level(logging.INFO, logger="peftlab.adapters.fused_blocks"):
        fallbacks = apply_fused_blocks(model)
    assert fallbacks == {
        "model.layers.0.self_attn.{q_proj,k_proj,v_proj}": "q_proj: bias",
        "model.layers.0.self_attn.{o_proj}": "o_proj: bias",
        "model.layers.1.self_attn.{q_proj,k_proj,v_proj}": "q_proj: bias",
        "model.layers.1.self_attn.{o_proj}": "o_proj: bias",
        "model.layers.1.mlp.{gate_proj,up_proj,down_proj}": "down_proj: LoRA dropout > 0",
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.layers.1.mlp.{gate_proj,up_proj,down_proj} (down_proj: LoRA dropout > 0)" \
        in warnings[0] and "model.layers.0.self_attn.{o_proj} (o_proj: bias)" in warnings[0]
    loss, got = loss_and_grads(model, params)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **FP32, msg=lambda m, k=k: f"{k}: {m}")


FAMILIES = {
    "mistral": (MistralConfig, {"sliding_window": 4}, {}),
    # q/k/v carry biases in Qwen2: that group stays per-module, o is fused
    "qwen2": (Qwen2Config, {}, {"model.layers.0.self_attn.{q_proj,k_proj,v_proj}": "q_proj: bias",
                                "model.layers.1.self_attn.{q_proj,k_proj,v_proj}": "q_proj: bias"}),
    # the GeGLU MLP stays per-module; attention (soft-cap, sliding window) is fused
    "gemma2": (Gemma2Config, {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4},
               {"model.layers.0.mlp.{gate_proj,up_proj,down_proj}": "GeGLU MLP (gelu_pytorch_tanh)",
                "model.layers.1.mlp.{gate_proj,up_proj,down_proj}": "GeGLU MLP (gelu_pytorch_tanh)"}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_match_their_unfused_forward(family):
    config_cls, kw, expected_fallbacks = FAMILIES[family]
    model = tiny(config_cls, **kw)
    inject_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref_loss, ref = loss_and_grads(model.train(), params)
    assert apply_fused_blocks(model) == expected_fallbacks
    loss, got = loss_and_grads(model, params)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **FP32, msg=lambda m, k=k: f"{k}: {m}")
    assert all(isinstance(m, LoraLinear) for m in lora_modules(model).values())


def test_on_the_cpu_the_models_own_rotation_is_used(monkeypatch):
    """The in-place RoPE kernel is for CUDA tensors; on the CPU transformers' rotation is faster (bench_rope)."""
    import peftlab.adapters.fused_blocks as fb

    calls = []
    monkeypatch.setattr(fb, "apply_rope_", lambda *a: calls.append(1))
    model = tiny()
    inject_lora(model, r=4, alpha=8)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref_loss, ref = loss_and_grads(model.train(), params)
    apply_fused_blocks(model)
    loss, got = loss_and_grads(model, params)
    assert not calls
    torch.testing.assert_close(loss, ref_loss, **FP32)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **FP32)


def test_the_recipe_key_applies_the_blocks_when_the_model_is_built(tmp_path, micro_dir, caplog):
    from helpers import tiny_recipe_dict

    from peftlab.model.load import build_model
    from peftlab.recipe.schema import Recipe

    raw = tiny_recipe_dict(tmp_path, tmp_path / "out", quantization={"mode": "none"}, train={"fused_blocks": True,
                                                                                              "device": "cpu"})
    with caplog.at_level(logging.INFO, logger="peftlab.adapters.fused_blocks"):
        model = build_model(Recipe.model_validate(raw)).model
    fused = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert fused and all(n.endswith((".self_attn", ".mlp")) for n in fused)
    assert any("whole-block autograd nodes" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="train.fused_blocks=true with kernels=off"):
        Recipe.model_validate({**raw, "kernels": "off"})
    with pytest.raises(ValueError, match=r"adapter.dropout=0.05: .* nothing would be fused; set adapter.dropout: 0"):
        Recipe.model_validate({**raw, "adapter": {**raw["adapter"], "dropout": 0.05}})
