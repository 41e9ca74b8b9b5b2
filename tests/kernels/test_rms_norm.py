"""RMSNorm: the reference is transformers' LlamaRMSNorm / Gemma2RMSNorm bit for bit; the Triton kernels (under
the interpreter) match the reference in values and gradients, fp32 and bf16, on odd small shapes."""
from __future__ import annotations

import pytest
import torch
from peftlab.kernels.rms_norm import reference_rms_norm, rms_norm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from peftlab.errors import PeftlabError

SHAPE = (2, 7, 24)  # odd rows; D below the block (32)
DTYPES = [torch.float32, torch.bfloat16]


def _modules(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    llama, gemma = LlamaRMSNorm(SHAPE[-1], eps=1e-5), Gemma2RMSNorm(SHAPE[-1], eps=1e-6)
    for m in (llama, gemma):
        m.weight.data = torch.randn(SHAPE[-1], generator=g) * 0.5 + (1.0 if m is llama else 0.0)
    return {"llama": (llama.to(dtype), 0.0, 1e-5), "gemma": (gemma.to(dtype), 1.0, 1e-6)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_reference_is_transformers_bit_for_bit(dtype, family):
    module, offset, eps = _modules(dtype)[family]
    x = torch.randn(SHAPE, dtype=dtype, requires_grad=True)
    dy = torch.randn(SHAPE, dtype=dtype)
    y_hf = module(x)
    (gx_hf, gw_hf) = torch.autograd.grad(y_hf, (x, module.weight), dy)
    w = module.weight.detach().clone().requires_grad_(True)
    y = reference_rms_norm(x, w, eps, offset=offset)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    for a, b in ((y, y_hf), (gx, gx_hf), (gw, gw_hf)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # "auto" on CPU is the reference
    assert torch.equal(rms_norm(x, w, eps, offset=offset), y)


def test_llama_rounding_with_a_wider_weight_follows_transformers():
    """An fp32 weight on bf16 activations: transformers' Llama norm returns fp32 (promotion), Gemma's bf16."""
    x = torch.randn(SHAPE, dtype=torch.bfloat16)
    mods = _modules(torch.float32)
    llama, _, _ = mods["llama"]
    assert torch.equal(reference_rms_norm(x, llama.weight, 1e-5), llama(x))
    gemma, _, _ = mods["gemma"]
    assert torch.equal(reference_rms_norm(x, gemma.weight, 1e-6, offset=1.0), gemma(x))
    for backend in ("torch", "triton"):
        assert rms_norm(x, llama.weight, 1e-5, backend=backend).dtype == torch.float32
        assert rms_norm(x, gemma.weight, 1e-6, offset=1.0, backend=backend).dtype == torch.bfloat16


# each dtype with each family, and each family with a frozen and a trainable weight (4 of the 8 combinations:
# the interpreter is slow, and the weight gradient does not depend on the dtype/family pairing)
@pytest.mark.parametrize("dtype, family, frozen", [
    (torch.float32, "llama", False), (torch.bfloat16, "llama", True),
    (torch.float32, "gemma", True), (torch.bfloat16, "gemma", False),
], ids=["fp32-llama-trainable", "bf16-llama-frozen", "fp32-gemma-frozen", "bf16-gemma-trainable"])
def test_triton_matches_reference(dtype, family, frozen, assert_kernel_close):
    """Values and gradients against the reference computed in fp32 from the same inputs (project tolerance);
    a frozen weight gets no gradient. 15 rows over 4 programs: the backward's row loop ends early."""
    _, offset, eps = _modules(dtype)[family]
    torch.manual_seed(1)
    x = (torch.randn(3, 5, 40) * 3).to(dtype)  # D=40: a partial block of 64
    w = torch.randn(40).to(dtype) * 0.5 + 1.0 - offset
    dy = torch.randn(3, 5, 40).to(dtype)
    xt, wt = x.clone().requires_grad_(True), w.clone().requires_grad_(not frozen)
    y = rms_norm(xt, wt, eps, offset=offset, backend="triton")
    y.backward(dy)
    xr, wr = x.float().requires_grad_(True), w.float().requires_grad_(True)
    if family == "llama" and dtype != torch.float32:
        # Llama rounds n to x's dtype before the weight: the fp32 model of that rounding point (autograd of
        # the cast rounds n's gradient too), else dweight = Σ dy·n carries the bf16 error of every n
        n = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + eps)
        y_ref = wr * n.to(dtype).float()
    else:
        y_ref = reference_rms_norm(xr, wr, eps, offset=offset)
    y_ref.backward(dy.float())
    assert y.dtype == dtype and y.shape == x.shape
    assert_kernel_close(y, y_ref, dtype, "y")
    assert_kernel_close(xt.grad, xr.grad, dtype, "dx")
    if frozen:
        assert wt.grad is None
    else:
        assert wt.grad.dtype == dtype
        assert_kernel_close(wt.grad, wr.grad, dtype, "dweight")


def test_triton_bf16_forward_rounds_like_transformers():
    """bf16 values: the kernel rounds exactly where transformers does (Llama: n, then the product; Gemma:
    once), so outputs equal the bf16 reference except where fp32 sums differ by an ulp before rounding."""
    x = torch.randn(4, 1, 40).to(torch.bfloat16)
    w = (torch.randn(40) * 0.5 + 1.0).to(torch.bfloat16)
    for offset in (0.0, 1.0):
        y = rms_norm(x, w, 1e-5, offset=offset, backend="triton")
        y_ref = reference_rms_norm(x, w, 1e-5, offset=offset)
        assert (y != y_ref).float().mean() < 0.05, f"offset={offset}: more than 5% of values differ in bf16"
        torch.testing.assert_close(y.float(), y_ref.float(), atol=0.0, rtol=2 ** -7)  # at most one bf16 ulp


def test_user_errors():
    x = torch.randn(2, 8)
    with pytest.raises(PeftlabError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(PeftlabError, match="backend must be one of"):
        rms_norm(x, torch.ones(8), 1e-6, backend="cuda")
    with pytest.raises(PeftlabError, match="float64"):
        rms_norm(x.double(), torch.ones(8, dtype=torch.float64), 1e-6, backend="triton")


def test_aot_compile(capsys):
    """The bf16 launches of a Llama-8B row (D=4096: forward in both rounding styles, the backward with the
    weight gradient and the Llama rounding, the superset of the other variants) compile for sm_80/89/90
    without register spills."""
    pytest.importorskip("triton")
    import importlib

    from peftlab.kernels.aot import assert_compiles

    mod = importlib.import_module("peftlab.kernels.rms_norm")
    launches = [launch for launch in mod.aot_launches(torch.bfloat16, 4096)
                if launch[2].get("COMPUTE_DW", True) and (launch[2]["CAST_BEFORE_WEIGHT"] or "COMPUTE_DW" not in launch[2])]
    reports = assert_compiles(launches, capsys=capsys)
    assert len(reports) == 3 * 3 and {r.arch for r in reports} == {80, 89, 90}
    assert all(r.n_spills == 0 for r in reports), "an RMSNorm launch spills registers"
