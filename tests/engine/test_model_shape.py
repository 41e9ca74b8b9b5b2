"""What the planner counts about a model on the meta device equals the loaded model, and the activation
bytes it predicts per token equal what autograd really saves for a decoder layer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe_dict

from peftlab.engine.model_shape import activation_bytes_per_token, model_shape, quantized_bytes
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
    predicted = activation_bytes_per_token(model_shape(r), elem=4, seq_len=tokens, attn=attn, dropout=dropout)
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
