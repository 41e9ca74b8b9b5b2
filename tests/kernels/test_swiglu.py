"""SwiGLU: the reference is transformers' gated-MLP activation bit for bit; the Triton kernels (interpreter)
match in values and gradients, fp32 and bf16, on odd small shapes, and the backward writes the gradients
over the saved gate/up buffers (a second backward through them is refused)."""
from __future__ import annotations

import pytest
import torch
from peftlab.kernels.swiglu import reference_swiglu, swiglu
from transformers.activations import ACT2FN

from peftlab.errors import PeftlabError

SHAPE = (2, 7, 40)  # 14 rows, width 40 (BLOCK is 1024: masked)
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(SHAPE, generator=g) * 3).to(dtype).requires_grad_(True)
    up = torch.randn(SHAPE, generator=g).to(dtype).requires_grad_(True)
    dh = torch.randn(SHAPE, generator=g).to(dtype)
    return gate, up, dh


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_transformers_bit_for_bit(dtype):
    gate, up, dh = _inputs(dtype)
    h_hf = ACT2FN["silu"](gate) * up  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
    grads_hf = torch.autograd.grad(h_hf, (gate, up), dh)
    h = reference_swiglu(gate, up)
    assert torch.equal(h, h_hf)
    for a, b in zip(torch.autograd.grad(h, (gate, up), dh), grads_hf, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(swiglu(gate, up), h)  # "auto" on CPU is the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference_backward_in_place(dtype, assert_kernel_close):
    """gate and up are the two halves of one fused gate_up output (row stride 2·I, no copy); after backward
    their buffers hold dgate and dup."""
    gate0, up0, dh = _inputs(dtype)
    x = torch.cat((gate0.detach(), up0.detach()), dim=-1).requires_grad_(True)
    fused = x * 1  # the (non-leaf) output of a fused gate_up projection
    gate, up = fused[..., :40], fused[..., 40:]
    h = swiglu(gate, up, backend="triton")
    (dx,) = torch.autograd.grad(h, x, dh)
    gr, ur = gate0.detach().float().requires_grad_(True), up0.detach().float().requires_grad_(True)
    h_ref = reference_swiglu(gr, ur)
    dg_ref, du_ref = torch.autograd.grad(h_ref, (gr, ur), dh.float())
    assert h.dtype == dtype
    assert_kernel_close(h, h_ref, dtype, "h")
    assert_kernel_close(dx[..., :40], dg_ref, dtype, "dgate")
    assert_kernel_close(dx[..., 40:], du_ref, dtype, "dup")
    # in place: the activation buffer now holds the gradients (nothing of the MLP's width was allocated)
    assert torch.equal(fused.detach(), dx)


def test_second_backward_is_refused_and_other_savers_fail_loudly():
    gate, up, dh = _inputs(torch.float32)
    g, u = gate * 1, up * 1
    h = swiglu(g, u, backend="triton")
    h.backward(dh, retain_graph=True)
    with pytest.raises(PeftlabError, match="backward ran twice"):
        h.backward(dh)
    # another op that saved `g` sees its version change instead of reading gradients silently
    gate2, up2, _ = _inputs(torch.float32)
    g2 = gate2 * 1
    other = (g2 * g2).sum()  # saves g2
    swiglu(g2, up2 * 1, backend="triton").backward(dh)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


def test_aliased_inputs_are_not_overwritten_twice():
    """swiglu(x, x): one buffer cannot hold two gradients; the Function keeps a copy of up."""
    gate, _, dh = _inputs(torch.float32)
    g = gate * 1
    h = swiglu(g, g, backend="triton")
    (dg,) = torch.autograd.grad(h, gate, dh)
    gr = gate.detach().requires_grad_(True)
    (dg_ref,) = torch.autograd.grad(reference_swiglu(gr, gr), gr, dh)
    torch.testing.assert_close(dg, dg_ref, atol=1e-5, rtol=5e-4)


def test_user_errors():
    gate, up, _ = _inputs(torch.float32)
    with pytest.raises(PeftlabError, match="same shape"):
        swiglu(gate, up[..., :-1])
    with pytest.raises(PeftlabError, match="one dtype"):
        swiglu(gate, up.bfloat16())


def test_aot_compile(capsys):
    """Forward and in-place backward launches (bf16) compile for sm_80/89/90 without register spills."""
    pytest.importorskip("triton")
    import importlib

    from peftlab.kernels.aot import assert_compiles

    reports = assert_compiles(importlib.import_module("peftlab.kernels.swiglu").aot_launches(torch.bfloat16),
                              capsys=capsys)
    assert len(reports) == 2 * 3 and {r.arch for r in reports} == {80, 89, 90}
    assert all(r.n_spills == 0 for r in reports), "a SwiGLU launch spills registers"
