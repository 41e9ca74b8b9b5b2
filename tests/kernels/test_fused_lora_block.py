"""Whole-block (Q)LoRA Functions vs plain autograd: outputs, dx, dA, dB on NF4 (double quant) and dense bases;
the Triton dequant (interpreter) into the shared buffer; what is saved for backward."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peftlab.kernels.fused_lora_block import (
    BUFFERS,
    LoraProjection,
    lora_gated_mlp,
    lora_projections,
    reference_lora_gated_mlp,
    reference_lora_projections,
)
from peftlab.kernels.nf4 import nf4_dequantize

from peftlab.errors import PeftlabError

TOL = {torch.float32: {"atol": 1e-5, "rtol": 5e-4}, torch.bfloat16: {"atol": 5e-3, "rtol": 5e-2}}
H, INTER, R = 40, 72, 4  # odd sizes: NF4 blocks (64) run across rows


def base(in_f: int, out_f: int, quant: bool, dtype: torch.dtype, seed: int, bias: bool = False) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(dtype)
    if not quant:
        lin = torch.nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        return lin.requires_grad_(False)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    return lin.to("cpu")


def proj(in_f: int, out_f: int, quant: bool, dtype: torch.dtype, seed: int, lora: bool = True) -> LoraProjection:
    if not lora:
        return LoraProjection(base(in_f, out_f, quant, dtype, seed))
    g = torch.Generator().manual_seed(seed + 100)
    a = (torch.randn(R, in_f, generator=g) * 0.1).requires_grad_()  # LoRA weights fp32, as peftlab keeps them
    b = (torch.randn(out_f, R, generator=g) * 0.1).requires_grad_()
    return LoraProjection(base(in_f, out_f, quant, dtype, seed), a, b, 2.0)


def lora_params(ps) -> list[torch.Tensor]:
    return [t for p in ps if p.has_lora for t in (p.lora_A, p.lora_B)]


def grads(fn, x, ps, backend, mlp: bool):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *ps, backend=backend) if mlp else fn(x, ps, backend=backend)
    outs = (out,) if mlp else out
    loss = sum((o.float() * torch.linspace(-1, 1, o.shape[-1])).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, [x, *lora_params(ps)])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("quant", [True, False], ids=["nf4", "dense"])
def test_qkv_projections_match_plain_autograd(quant, backend):
    # q and v with LoRA, k without (target_modules=[q_proj, v_proj]); GQA-like output sizes
    ps = [proj(H, H, quant, torch.float32, 1), proj(H, 24, quant, torch.float32, 2, lora=False),
          proj(H, 24, quant, torch.float32, 3)]
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(0))
    got_y, got_g = grads(lora_projections, x, ps, backend, mlp=False)
    ref_y, ref_g = grads(reference_lora_projections, x, ps, backend, mlp=False)
    for a, b in zip(got_y + list(got_g), ref_y + list(ref_g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("quant", [True, False], ids=["nf4", "dense"])
def test_gated_mlp_matches_plain_autograd(quant, backend):
    ps = [proj(H, INTER, quant, torch.float32, 4), proj(H, INTER, quant, torch.float32, 5),
          proj(INTER, H, quant, torch.float32, 6)]
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(0))
    got_y, got_g = grads(lora_gated_mlp, x, ps, backend, mlp=True)
    ref_y, ref_g = grads(reference_lora_gated_mlp, x, ps, backend, mlp=True)
    assert len(got_g) == 7  # dx + (dA, dB) of gate, up, down
    for a, b in zip(got_y + list(got_g), ref_y + list(ref_g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_gated_mlp_bf16_against_fp32_of_the_same_inputs():
    ps = [proj(H, INTER, True, torch.bfloat16, 7), proj(H, INTER, True, torch.bfloat16, 8, lora=False),
          proj(INTER, H, True, torch.bfloat16, 9)]
    x = torch.randn(2, 6, H, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    got_y, got_g = grads(lora_gated_mlp, x, ps, "torch", mlp=True)
    ref_y, ref_g = grads(reference_lora_gated_mlp, x.float(), ps, "torch", mlp=True)
    for a, b in zip(got_y + list(got_g), ref_y + list(ref_g)):
        torch.testing.assert_close(a.float(), b.float(), **TOL[torch.bfloat16])


def test_weights_are_dequantised_into_one_reused_buffer():
    BUFFERS.clear()
    small, big = base(H, 24, True, torch.float32, 1), base(H, INTER, True, torch.float32, 2)
    x = torch.randn(4, H)
    lora_projections(x, [LoraProjection(small), LoraProjection(big)], backend="triton")
    assert BUFFERS.nbytes() == INTER * H * 4  # one fp32 buffer the size of the biggest weight
    # what the buffer holds is bit for bit the standalone Triton dequant
    assert torch.equal(BUFFERS.view((INTER, H), torch.float32, x.device),
                       nf4_dequantize(big.weight, big.weight.quant_state, out_dtype=torch.float32, backend="triton"))
    BUFFERS.clear()


def test_backward_saves_the_input_once_and_no_weights_or_mlp_products():
    ps = [proj(H, INTER, True, torch.float32, 4), proj(H, INTER, True, torch.float32, 5),
          proj(INTER, H, True, torch.float32, 6)]
    x = torch.randn(3, 7, H).requires_grad_()

    def saved_elements(fn) -> int:
        n = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.append(t.numel()) or t, lambda t: t):
            fn(x, *ps)
        return sum(n)

    tokens, lora = 21, sum(t.numel() for t in lora_params(ps))
    fused = saved_elements(lora_gated_mlp)
    # x, gate, up, the three (tokens, r) fp32 products and the LoRA matrices: nothing else
    assert fused == tokens * H + 2 * tokens * INTER + 3 * tokens * R + lora
    assert fused < saved_elements(reference_lora_gated_mlp)


def test_biased_base_is_refused_with_the_way_out():
    p = LoraProjection(base(H, 8, False, torch.float32, 1, bias=True))
    with pytest.raises(PeftlabError, match="bias.*per-module path"):
        lora_projections(torch.randn(2, H), [p])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_second_backward_through_the_mlp_fails_loudly(backend):
    # the SwiGLU backward overwrites the saved gate/up with their gradients (in place, both backends)
    ps = [proj(H, INTER, False, torch.float32, 4), proj(H, INTER, False, torch.float32, 5),
          proj(INTER, H, False, torch.float32, 6)]
    y = lora_gated_mlp(torch.randn(3, H).requires_grad_(), *ps, backend=backend)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
