"""Long context: offloaded checkpoint inputs and the chunked MLP give the loss and LoRA gradients of the plain
(non-reentrant) gradient-checkpointed run on a tiny Llama; the offloader prefetches one layer ahead; the wiring."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.model.load import enable_gradient_checkpointing
from peftlab.model.long_context import (
    ActivationOffloader,
    OffloadedCheckpoint,
    apply_activation_offload,
    apply_mlp_chunking,
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
    from peftlab.model.long_context import release_storage

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


def _bf16_kernel_model(dropout: float) -> LlamaForCausalLM:
    """A tiny bf16 Llama on the kernel path (fused_lora_linear under the Triton interpreter), transformers' RMSNorm,
    gradient checkpointing, the layer inputs offloaded."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    inject_lora(model, r=4, alpha=8, dropout=dropout, kernel_backend="triton")
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    model.config.use_cache = False
    enable_gradient_checkpointing(model)
    apply_activation_offload(model)
    return model.train()


def test_lean_recompute_keeps_less_with_the_same_gradients():
    """The offloaded layer's recompute keeps the dropout keep-masks as RNG states, the first norm's output as the
    norm's input, and transformers' bf16 RMSNorm's fp32 copies as the bf16 inputs: loss and every LoRA gradient
    are bit-identical to the same run keeping the tensors, and the bytes not kept are the masks, one normed input
    per layer (the MLP's too, unchunked) and both norms' fp32 copies."""
    plain = _bf16_kernel_model(0.1)
    plain.model.layers[0]._gradient_checkpointing_func.offloader.lean = None
    ref_loss, ref_grads = loss_and_grads(plain)
    model = _bf16_kernel_model(0.1)
    lean = model.model.layers[0]._gradient_checkpointing_func.offloader.lean
    loss, grads = loss_and_grads(model)
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
    tokens, layers, hidden, inter = 2 * 11, 2, 32, 64
    widths = 6 * hidden + inter  # q, k, v, o, gate, up: hidden wide; down: intermediate
    assert lean.kept == {"mask": layers * tokens * widths, "norm_output": layers * 2 * tokens * hidden * 2,
                         "upcast": layers * 2 * tokens * hidden * 4}
    assert not lean.on and lean.norm_outputs == {}


def test_lean_recompute_bytes_are_what_the_planner_counts():
    """Every tensor the lean recompute still keeps (unique storages, parameters and RoPE's cos/sin left out, and
    the layer input, which the offloader holds) against layer_activations(lean=True)."""
    from peftlab.engine.model_shape import ModelShape, layer_activations

    model = _bf16_kernel_model(0.1)
    lean = model.model.layers[0]._gradient_checkpointing_func.offloader.lean
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}
    held = []  # no storage is freed and its address reused during the count
    pack = lean._pack

    def counting_pack(t):
        out = pack(t)
        rope = t.shape[-1] == 8 and t.numel() == 11 * 8  # cos / sin (one row of positions): the model's, every layer
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in params and not rope:
            kept[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
            held.append(out)
        return out

    lean._pack = counting_pack
    loss_and_grads(model)
    tokens, hidden = 2 * 11, 32
    widths = {f"self_attn.{p}_proj": hidden for p in "qkvo"} | {"mlp.gate_proj": hidden, "mlp.up_proj": hidden,
                                                                 "mlp.down_proj": 64}
    shape = ModelShape("llama", 2, hidden, 64, 4, 2, 8, 300, 0, 0, 0, 0, 0, widths, 4)
    la = layer_activations(shape, elem=2, seq_len=11, attn="sdpa", dropout=0.1, kernel=True, lean=True)
    # the residual (the second norm's input) is kept by its fp32 copy's handle, not as a saved tensor
    per_layer = (la.attention + la.mlp - hidden * 2) * tokens
    assert sum(kept.values()) == 2 * per_layer, (sum(kept.values()), 2 * per_layer)


def test_lean_keeps_a_norm_output_changed_in_place():
    """A norm output modified in place before it is saved (in-place RoPE on a normed q would be) is kept as it is:
    recomputing the norm would give the values before the change."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from peftlab.model.long_context import LeanSaved

    holder = nn.Module()
    holder.norm = LlamaRMSNorm(8)
    lean = LeanSaved([holder])
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)

    def run(session):
        with session:
            y = holder.norm(x)
            y.mul_(2.0)
            (y * w).sum().backward()
        grads = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        return grads

    ref = run(LeanSaved.active(None))
    assert all(torch.equal(a, b) for a, b in zip(run(LeanSaved.active(lean)), ref))
    assert lean.kept["norm_output"] == 0


def test_lean_keeps_a_norm_output_whose_input_changed_in_place():
    """The norm's input changed in place after the norm and before its output is saved: recomputing the norm
    from that input would give other values and a wrong gradient without any error (the first layer's input and
    the norm weight need no gradient, so the norm's own backward, which would notice, never runs): the output is
    kept as it is."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from peftlab.model.long_context import LeanSaved

    holder = nn.Module()
    holder.norm = LlamaRMSNorm(8)
    holder.norm.requires_grad_(False)
    lean = LeanSaved([holder])

    def run(session):
        torch.manual_seed(0)
        x = torch.randn(3, 8)
        w = torch.randn(3, 8, requires_grad=True)
        with session:
            y = holder.norm(x)
            x.add_(1.0)
            (y * w).sum().backward()
        return w.grad

    ref = run(LeanSaved.active(None))
    assert torch.equal(run(LeanSaved.active(lean)), ref)
    assert lean.kept["norm_output"] == 0


def test_lean_remakes_only_a_norm_called_on_its_input_alone():
    """The recompute calls ``norm(x)``: a norm called with more (a second argument, a keyword) keeps its output."""
    from peftlab.model.long_context import LeanSaved

    class ScaledRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8), requires_grad=False)

        def forward(self, x, scale=1.0):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale

    holder = nn.Module()
    holder.norm = ScaledRMSNorm()
    lean = LeanSaved([holder])

    def run(session, **kw):
        torch.manual_seed(0)
        x = torch.randn(3, 8)
        w = torch.randn(3, 8, requires_grad=True)
        with session:
            y = holder.norm(x, **kw)
            (y * w).sum().backward()
        return w.grad

    for kw in ({"scale": 3.0},):
        ref = run(LeanSaved.active(None), **kw)
        assert torch.equal(run(LeanSaved.active(lean), **kw), ref)
        assert lean.kept["norm_output"] == 0
    assert torch.equal(run(LeanSaved.active(lean)), run(LeanSaved.active(None)))
    assert lean.kept["norm_output"] > 0  # the same norm on its input alone is remade


def test_an_upcast_is_matched_to_the_very_output_it_copies():
    """Two chunks of one split share their autograd node: the fp32 copy of the other chunk is no cast of x."""
    from peftlab.model.long_context import _is_cast_of

    base = torch.randn(4, 8, requires_grad=True).bfloat16()
    x, other = base.split(2)
    assert _is_cast_of(x.float(), x)
    assert not _is_cast_of(other.float(), x)


class _HostSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for a tensor's value (``.item()``/``bool()``, ``torch.equal``)."""

    SYNCS = ("aten._local_scalar_dense", "aten.equal", "aten.is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += any(str(func).startswith(name + ".") for name in self.SYNCS)
        return func(*args, **(kwargs or {}))


def _backward_syncs(model) -> tuple[int, dict]:
    """(host syncs during the backward pass, the LoRA gradients)."""
    syncs, entered = _HostSyncs(), []
    try:
        _, grads = loss_and_grads(model, lambda: entered.append(syncs.__enter__()))
    finally:
        if entered:
            syncs.__exit__(None, None, None)
    return syncs.count, grads


def test_lean_reads_the_mask_checks_once_per_recompute():
    """Each adapted layer's redrawn dropout mask is compared with the real one on the device; the answers are read
    with ONE host sync per recomputed decoder layer (on a GPU a sync per adapted layer stalls the backward 7 times
    per layer), and the gradients are still bit-identical to keeping the masks."""
    plain = _bf16_kernel_model(0.1)
    plain.model.layers[0]._gradient_checkpointing_func.offloader.lean = None
    plain_syncs, ref_grads = _backward_syncs(plain)
    model = _bf16_kernel_model(0.1)
    lean = model.model.layers[0]._gradient_checkpointing_func.offloader.lean
    lean_syncs, grads = _backward_syncs(model)
    assert lean.kept["mask"] > 0 and lean_syncs - plain_syncs == 2  # two layers recomputed, one read each
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_lean_keeps_the_masks_of_a_module_that_does_not_redraw_them(monkeypatch):
    """A forward pre-hook that uses the RNG before q_proj draws its mask (so the redraw from the state LeanSaved
    recorded is another mask): the mismatch is found after the recompute, that module keeps its masks, the layer
    is recomputed, and loss and gradients are bit-identical to keeping every mask — in this step and the next."""
    from peftlab.model import long_context

    def consume_rng(module, args):
        torch.rand(1)

    warnings = []  # on the module's logger itself: a training run's setup_logging stops propagation to caplog
    monkeypatch.setattr(long_context.logger, "warning", lambda msg, *a: warnings.append(msg % a))

    models = [_bf16_kernel_model(0.1), _bf16_kernel_model(0.1)]
    models[0].model.layers[0]._gradient_checkpointing_func.offloader.lean = None
    for model in models:
        for layer in model.model.layers:
            layer.self_attn.q_proj.register_forward_pre_hook(consume_rng)
    lean = models[1].model.layers[0]._gradient_checkpointing_func.offloader.lean
    tokens, layers, hidden, inter = 2 * 11, 2, 32, 64
    for step in range(2):
        ref_loss, ref_grads = loss_and_grads(models[0])
        loss, grads = loss_and_grads(models[1])
        assert torch.equal(loss, ref_loss)
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), (step, name)
        # every mask but q_proj's redrawn: k, v, o, gate, up (hidden wide) and down (intermediate)
        assert lean.kept["mask"] == (step + 1) * layers * tokens * (5 * hidden + inter)
    assert set(lean.keep_masks) == {layer.self_attn.q_proj for layer in models[1].model.layers}
    assert len(warnings) == 1 and "could not be redrawn" in warnings[0]
