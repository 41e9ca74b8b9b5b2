"""LeanSaved (peftlab/model/lean_recompute.py): the recompute of an offloaded layer keeps dropout masks as RNG
states, norm outputs as the norm's input and 16-bit norms' fp32 copies as their input — loss and LoRA gradients
bit-identical to keeping the tensors, the bytes not kept what the planner counts, a tensor changed in place
kept as it is, the mask checks read once per recompute, a mask that does not redraw kept."""
from __future__ import annotations

import pytest
import torch
from test_long_context import loss_and_grads
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.model import lean_recompute
from peftlab.model.lean_recompute import LeanSaved, _is_cast_of, restored_rng, rng_state
from peftlab.model.load import enable_gradient_checkpointing
from peftlab.model.long_context import apply_activation_offload


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


def _lean_of(model: LlamaForCausalLM) -> LeanSaved | None:
    return model.model.layers[0]._gradient_checkpointing_func.offloader.lean


def _plain_and_lean(dropout: float = 0.1) -> tuple[LlamaForCausalLM, LlamaForCausalLM, LeanSaved]:
    """Two identical offloaded models: the first's recompute keeps every saved tensor (no LeanSaved), the second's
    runs under its LeanSaved (returned too)."""
    plain = _bf16_kernel_model(dropout)
    plain.model.layers[0]._gradient_checkpointing_func.offloader.lean = None
    model = _bf16_kernel_model(dropout)
    return plain, model, _lean_of(model)


def test_restored_rng_draws_from_the_state_and_restores_the_one_before():
    state = rng_state(torch.device("cpu"))
    first = torch.rand(4)
    torch.rand(3)  # the state before the block is not the one drawing `first` leaves
    after = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="inside"), restored_rng(torch.device("cpu"), state):
        assert torch.equal(torch.rand(4), first)  # the state given
        raise RuntimeError("inside")  # and the one before is back even when the body fails
    assert torch.equal(torch.get_rng_state(), after)


def test_lean_recompute_keeps_less_with_the_same_gradients():
    """The offloaded layer's recompute keeps the dropout keep-masks as RNG states, the first norm's output as the
    norm's input, and transformers' bf16 RMSNorm's fp32 copies as the bf16 inputs: loss and every LoRA gradient
    are bit-identical to the same run keeping the tensors, and the bytes not kept are the masks, one normed input
    per layer (the MLP's too, unchunked) and both norms' fp32 copies."""
    plain, model, lean = _plain_and_lean()
    ref_loss, ref_grads = loss_and_grads(plain)
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
    lean = _lean_of(model)
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
    plain, model, lean = _plain_and_lean()
    plain_syncs, ref_grads = _backward_syncs(plain)
    lean_syncs, grads = _backward_syncs(model)
    assert lean.kept["mask"] > 0 and lean_syncs - plain_syncs == 2  # two layers recomputed, one read each
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_lean_keeps_the_masks_of_a_module_that_does_not_redraw_them(monkeypatch):
    """A forward pre-hook that uses the RNG before q_proj draws its mask (so the redraw from the state LeanSaved
    recorded is another mask): the mismatch is found after the recompute, that module keeps its masks, the layer
    is recomputed, and loss and gradients are bit-identical to keeping every mask — in this step and the next."""
    def consume_rng(module, args):
        torch.rand(1)

    warnings = []  # on the module's logger itself: a training run's setup_logging stops propagation to caplog
    monkeypatch.setattr(lean_recompute.logger, "warning", lambda msg, *a: warnings.append(msg % a))

    plain, model, lean = _plain_and_lean()
    for m in (plain, model):
        for layer in m.model.layers:
            layer.self_attn.q_proj.register_forward_pre_hook(consume_rng)
    tokens, layers, hidden, inter = 2 * 11, 2, 32, 64
    for step in range(2):
        ref_loss, ref_grads = loss_and_grads(plain)
        loss, grads = loss_and_grads(model)
        assert torch.equal(loss, ref_loss)
        for name, g in grads.items():
            assert torch.equal(g, ref_grads[name]), (step, name)
        # every mask but q_proj's redrawn: k, v, o, gate, up (hidden wide) and down (intermediate)
        assert lean.kept["mask"] == (step + 1) * layers * tokens * (5 * hidden + inter)
    assert set(lean.keep_masks) == {layer.self_attn.q_proj for layer in model.model.layers}
    assert len(warnings) == 1 and "could not be redrawn" in warnings[0]
