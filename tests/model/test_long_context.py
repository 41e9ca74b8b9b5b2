"""Long context: offloaded checkpoint inputs and the chunked MLP give the loss and LoRA gradients of the plain
(non-reentrant) gradient-checkpointed run on a tiny Llama; the offloader prefetches one layer ahead; the wiring."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.model.load import enable_gradient_checkpointing
from peftlab.model.long_context import (
    ActivationOffloader,
    OffloadedCheckpoint,
    apply_activation_offload,
    apply_mlp_chunking,
    release_storage,
)
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss

EXACT = {"atol": 1e-6, "rtol": 1e-5}  # fp32: only the summation order of a chunked matmul may differ


def tiny(dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).float()
    model.requires_grad_(False)
    inject_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    model.config.use_cache = False
    enable_gradient_checkpointing(model)
    model.train()
    return model


def loss_and_grads(model, before_backward=lambda: None):
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    torch.manual_seed(5)  # LoRA dropout masks
    loss = causal_lm_loss(model, batch, normalizer=17.0, settings=LossSettings(backend="torch"))
    before_backward()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("offload,chunk,dropout", [(True, None, 0.1), (False, 4, 0.0), (True, 3, 0.0)],
                         ids=["offload+dropout", "mlp_chunk", "both"])
def test_same_loss_and_lora_gradients(offload, chunk, dropout):
    ref_loss, ref_grads = loss_and_grads(tiny(dropout))
    model = tiny(dropout)
    if offload:
        assert apply_activation_offload(model) == 2
    calls = []
    if chunk:
        assert apply_mlp_chunking(model, chunk) == 2
        mlp = model.model.layers[0].mlp
        run = mlp._peftlab_mlp_forward
        mlp._peftlab_mlp_forward = lambda x: calls.append(x.shape[-2]) or run(x)

    def check_forward():  # the paths really ran: both layer inputs offloaded, the MLP in chunks
        if offload:
            assert len(model.model.layers[0]._gradient_checkpointing_func.offloader.pending) == 2
        if chunk:
            assert calls == [chunk] * (11 // chunk) + [11 % chunk]

    loss, grads = loss_and_grads(model, check_forward)
    torch.testing.assert_close(loss, ref_loss, **EXACT)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, ref_grads[name], **EXACT, msg=name)
    if offload:  # every saved input was fetched and released: nothing kept after the step
        assert model.model.layers[0]._gradient_checkpointing_func.offloader.pending == []


def test_offloader_prefetches_the_previous_layer_in_backward():
    off = ActivationOffloader()
    xs = [torch.full((2, 3), float(i)) for i in range(3)]
    saved = [off.offload(x) for x in xs]
    assert off.fetch(saved[2]) is xs[2] or torch.equal(off.fetch(saved[2]), xs[2])
    assert saved[1].device_copy is not None and saved[0].device_copy is None  # one layer ahead, no more
    off.release(saved[2])
    assert torch.equal(off.fetch(saved[1]), xs[1]) and saved[0].device_copy is not None
    off.release(saved[1])
    off.release(saved[0])
    assert off.pending == []
    a, b = off.offload(xs[0]), off.offload(xs[1])
    assert (a.slot, b.slot) == (0, 1)
    off.release(a)
    assert off.offload(xs[2]).slot == 0  # a free pinned buffer is reused, a live one never
    del b  # a graph dropped without backward frees its entries
    assert off.pending == []


def test_offload_needs_gradient_checkpointing(tmp_path):
    from helpers import tiny_recipe_dict
    from pydantic import ValidationError

    from peftlab.recipe.schema import Recipe

    raw = tiny_recipe_dict(tmp_path, tmp_path / "out", train={"offload_activations": True})
    with pytest.raises(ValidationError, match="set model.gradient_checkpointing: true"):
        Recipe.model_validate(raw)


def test_build_model_applies_both(tmp_path):
    from helpers import tiny_recipe_dict

    from peftlab.model.load import build_model
    from peftlab.recipe.schema import Recipe

    raw = tiny_recipe_dict(tmp_path, tmp_path / "out", model={"gradient_checkpointing": True},
                           train={"device": "cpu", "offload_activations": True, "mlp_chunk_tokens": 16})
    model = build_model(Recipe.model_validate(raw)).model
    for layer in model.model.layers:
        assert isinstance(layer._gradient_checkpointing_func, OffloadedCheckpoint)
        assert layer.mlp._peftlab_mlp_chunk == 16


def test_recomputed_layer_output_is_freed_before_its_backward():
    """In backward the offloaded layer is recomputed; its output (tokens x hidden) is needed only for its shape
    and graph, so its memory is released before back-propagating — same loss and gradients as the plain run."""
    ref_loss, ref_grads = loss_and_grads(tiny(0.1))
    model = tiny(0.1)
    apply_activation_offload(model)
    outputs = []
    fn = model.model.layers[0]._gradient_checkpointing_func

    def capture(out):  # each recomputed output (the forward pass runs the layer without grad)
        if torch.is_grad_enabled():
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return out

    for layer in model.model.layers:
        layer._gradient_checkpointing_func = lambda run, *a: fn(lambda *b, **k: capture(run(*b, **k)), *a)
    loss, grads = loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, **EXACT)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **EXACT, msg=name)
    assert len(outputs) == 2 and all(o.untyped_storage().nbytes() == 0 for o in outputs)


def test_release_storage_keeps_what_autograd_saved_or_shares():
    x = torch.randn(4, 3, requires_grad=True)
    fresh = x + 1  # AddBackward saves nothing
    release_storage(fresh)
    assert fresh.untyped_storage().nbytes() == 0
    saved = x.exp()  # ExpBackward saves its result
    release_storage(saved)
    assert saved.untyped_storage().nbytes() == 4 * 3 * 4
    view = (x + 1)[1:]
    release_storage(view)
    assert view.untyped_storage().nbytes() == 4 * 3 * 4
    leaf = torch.randn(2)
    release_storage(leaf)
    assert leaf.untyped_storage().nbytes() == 8
