"""What the planner counts about a model on the meta device equals the loaded model, and the activation
bytes it predicts per token equal what autograd really saves for a decoder layer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe_dict

from peftlab.engine.model_shape import (
    ModelShape,
    layer_activations,
    model_shape,
    quantized_bytes,
)
from peftlab.model.load import build_model
from peftlab.recipe.parse import recipe_from_dict


def _recipe(tmp_path: Path, **sections):
    return recipe_from_dict(tiny_recipe_dict(tmp_path / "data", tmp_path / "out", **sections))


def test_counts_match_the_real_model(tmp_path):
    """Adapter and 4-bit weight bytes on meta equal those of the loaded model."""
    r = _recipe(tmp_path)
    shape = model_shape(r)
    loaded = build_model(r)
    lora = sum(p.numel() for n, p in loaded.model.named_parameters() if "lora_" in n)
    assert shape.lora_params == lora
    real = 0
    for name, p in loaded.model.named_parameters():
        if "lora_" in name:
            continue
        real += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            real += qs.absmax.nbytes + qs.code.nbytes + qs.state2.absmax.nbytes + qs.state2.code.nbytes + 4
            assert p.numel() * p.element_size() + qs.absmax.nbytes + qs.code.nbytes + qs.state2.absmax.nbytes \
                + qs.state2.code.nbytes + 4 == quantized_bytes(qs.shape.numel(), 64, True)
    real += sum(b.nbytes for b in loaded.model.buffers())
    assert shape.base_weight_bytes == real
    assert shape.quantized_params + shape.dense_params + shape.lora_params > 0
    assert set(shape.lora_modules_per_layer) == {f"self_attn.{p}_proj" for p in "qkvo"} | {
        f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert shape.lora_modules_per_layer["mlp.down_proj"] == shape.intermediate


@pytest.mark.parametrize("attn, dropout", [("sdpa", 0.0), ("eager", 0.1)])
def test_activation_bytes_are_what_autograd_saves(tmp_path, attn, dropout):
    """Every tensor autograd saves while decoder layer 0 runs forward (storages counted once), per token,
    against the prediction: eager attention adds the probabilities, LoRA dropout each adapted layer's input."""
    r = _recipe(tmp_path, model={"attn_implementation": attn}, adapter={"dropout": dropout})
    model = build_model(r).model.train()
    saved: dict[int, int] = {}
    inside = [False]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if inside[0]:
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    tokens = 64
    ids = torch.randint(0, 200, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    measured = sum(saved.values()) / tokens
    predicted = layer_activations(model_shape(r), elem=4, seq_len=tokens, attn=attn, dropout=dropout).total
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_frozen_16bit_embeddings_and_head_count_two_bytes_on_cpu(tmp_path, micro_dir):
    """model.frozen_16bit keeps a bf16 checkpoint's frozen embeddings and untied head in 2 bytes on an fp32 CPU
    run: the planner's prediction is lower by exactly vocab x hidden x 2 bytes per matrix (not on a GPU)."""
    import json

    from peftlab.engine.planner import estimate

    cfg = json.loads((micro_dir / "config.json").read_text())
    ckpt = tmp_path / "bf16"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    r = _recipe(tmp_path, model={"name": str(ckpt)})
    off = _recipe(tmp_path, model={"name": str(ckpt), "frozen_16bit": False})
    per_matrix = cfg["vocab_size"] * cfg["hidden_size"] * 2
    assert model_shape(off, device="cpu").base_weight_bytes - model_shape(r, device="cpu").base_weight_bytes \
        == 2 * per_matrix  # embeddings + untied head
    kw = {"device": "cpu", "baseline": 0}
    assert estimate(off, **kw).total - estimate(r, **kw).total == 2 * per_matrix
    assert model_shape(r, device="cuda").base_weight_bytes == model_shape(off, device="cuda").base_weight_bytes
    (ckpt / "config.json").write_text(json.dumps({**cfg, "dtype": "float32"}))  # fp32 values: stay fp32
    assert model_shape(r, device="cpu").base_weight_bytes == model_shape(off, device="cpu").base_weight_bytes


def _saved_bytes_per_token(layer, x, cos, sin, mask, skip: set[int]) -> float:
    """Every storage autograd saves while ``layer`` runs forward (each counted once, the parameters, cos/sin and
    the input left out), per token."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=torch.arange(x.shape[1])[None])
    return sum(saved.values()) / x.shape[1]


@pytest.mark.parametrize("dtype, attn, masked, dropout, kernel, fused_norm", [
    ("float32", "sdpa", False, 0.0, False, False),
    ("float32", "eager", True, 0.05, False, False),
    ("bfloat16", "sdpa", False, 0.0, False, False),
    ("bfloat16", "sdpa", True, 0.05, False, False),
    ("bfloat16", "sdpa", False, 0.05, True, True),
    ("bfloat16", "sdpa", True, 0.0, True, False),
    ("bfloat16", "eager", True, 0.05, True, False),
], ids=["fp32-torch", "fp32-eager-dropout", "bf16-torch", "bf16-torch-dropout-masked", "bf16-kernel-dropout-fusednorm",
        "bf16-kernel-masked", "bf16-kernel-eager-dropout"])
def test_layer_activations_are_exactly_what_autograd_saves(dtype, attn, masked, dropout, kernel, fused_norm):
    """One Llama decoder layer with LoRA on every linear, on each path the planner tells apart: the PyTorch path
    (fp32 copies of 16-bit LoRA inputs, dropout's dropped copy + mask), the kernel path (``fused_lora_linear`` and
    the fused RMSNorm, Triton interpreter: the input itself, a 1-byte mask), transformers' 16-bit RMSNorm (an fp32
    copy), SDPA with a mask (k / v repeated to every head), eager attention: predicted bytes == saved bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.adapters.lora_inject import inject_lora
    from peftlab.model.fused_norm import apply_fused_norm

    torch.manual_seed(0)
    H, inter, heads, kv, r, T = 64, 160, 4, 2, 4, 16
    dt = getattr(torch, dtype)
    cfg = LlamaConfig(vocab_size=300, hidden_size=H, intermediate_size=inter, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv, attn_implementation=attn)
    model = LlamaForCausalLM(cfg).to(dt)
    model.requires_grad_(False)
    backend = "triton" if kernel else "torch"
    inject_lora(model, r=r, alpha=8, dropout=dropout, kernel_backend=backend)
    if fused_norm:
        apply_fused_norm(model, backend=backend)
    model.train()
    x = torch.randn(1, T, H, dtype=dt, requires_grad=True)
    cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] if masked else None
    if masked and attn == "eager":
        mask = torch.zeros(1, 1, T, T, dtype=dt).masked_fill(~mask, torch.finfo(dt).min)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), cos, sin, x]}
    measured = _saved_bytes_per_token(model.model.layers[0], x, cos, sin, mask, skip)
    widths = {f"self_attn.{p}_proj": H for p in "qkvo"} | {"mlp.gate_proj": H, "mlp.up_proj": H, "mlp.down_proj": inter}
    shape = ModelShape("llama", 1, H, inter, heads, kv, H // heads, 300, 0, 0, 0, 0, 0, widths, r)
    la = layer_activations(shape, elem=dt.itemsize, seq_len=T, attn=attn, dropout=dropout, kernel=kernel,
                           fused_norm=fused_norm, sdpa_mask=masked)
    assert la.total - la.layer_input == measured, (la, measured)  # the input is the caller's, left out above


@pytest.mark.parametrize("unfreeze", [["head"], ["embeddings", "head"], ["embed_tokens"]])
def test_unfrozen_modules_count_as_trainable_like_the_real_model(tmp_path, unfreeze):
    """adapter.unfreeze: the meta model's trainable parameters (LoRA + unfrozen) equal the loaded model's after the
    trainer's own unfreeze_modules; whether the output head trains is known (the loss then computes its gradient)."""
    from peftlab.adapters.freezing import unfreeze_modules

    r = _recipe(tmp_path, adapter={"unfreeze": unfreeze})
    shape = model_shape(r)
    model = build_model(r).model
    unfreeze_modules(model, r.adapter.unfreeze)
    assert shape.lora_params + shape.unfrozen_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.unfrozen_params > 0
    assert shape.head_trainable == model.get_output_embeddings().weight.requires_grad
    assert model_shape(_recipe(tmp_path)).unfrozen_params == 0
