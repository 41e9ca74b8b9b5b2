"""RoPE in place: the reference is transformers' apply_rotary_pos_emb bit for bit (cos/sin from its Llama-3
rotary module); the Triton kernel (interpreter) matches in values and gradients, fp32 and bf16, on odd small
shapes with grouped-query heads and partial rotary; q and k are rotated where they lie."""
from __future__ import annotations

import pytest
import torch
from peftlab.kernels.rope import apply_rope_, reference_apply_rope_
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from peftlab.errors import PeftlabError

B, T, HQ, HK, D = 2, 7, 3, 1, 24
DTYPES = [torch.float32, torch.bfloat16]


def _cos_sin(dtype: torch.dtype, rotary_dim: int = D, batch: int = 1):
    """cos/sin as transformers' Llama rotary module returns them, with Llama-3 frequency scaling."""
    cfg = LlamaConfig(hidden_size=rotary_dim * 4, num_attention_heads=4, max_position_embeddings=64,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    rotary = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(batch, T, rotary_dim, dtype=dtype)
    positions = torch.stack([torch.arange(T) + 3 * i for i in range(batch)])  # per-row positions (packing)
    return rotary(x, positions)


def _projections(dtype: torch.dtype, seed: int = 0):
    """q, k as attention builds them: views (B, H, T, D) of (B, T, H·D) projection outputs, plus the leaves."""
    g = torch.Generator().manual_seed(seed)
    q_proj = torch.randn(B, T, HQ * D, generator=g).to(dtype).requires_grad_(True)
    k_proj = torch.randn(B, T, HK * D, generator=g).to(dtype).requires_grad_(True)
    q = (q_proj * 1).view(B, T, HQ, D).transpose(1, 2)  # * 1: a non-leaf, as a projection's output is
    k = (k_proj * 1).view(B, T, HK, D).transpose(1, 2)
    return q_proj, k_proj, q, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_transformers_bit_for_bit(dtype):
    cos, sin = _cos_sin(dtype, batch=B)
    qp, kp, q, k = _projections(dtype)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    gq, gk = torch.randn_like(q_hf), torch.randn_like(k_hf)
    grads_hf = torch.autograd.grad((q_hf, k_hf), (qp, kp), (gq, gk))
    qp2, kp2, q2, k2 = _projections(dtype)
    out = reference_apply_rope_(q2, k2, cos, sin)
    assert out[0] is q2 and out[1] is k2  # in place
    assert torch.equal(q2, q_hf) and torch.equal(k2, k_hf)
    for a, b in zip(torch.autograd.grad((q2, k2), (qp2, kp2), (gq, gk)), grads_hf, strict=True):
        assert torch.equal(a, b)
    # the projection outputs were rotated where they lie
    assert torch.equal(q2.transpose(1, 2).reshape(B, T, HQ * D), q2._base.view(B, T, HQ * D))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rotary_dim", [D, 16], ids=["full", "partial"])
def test_triton_matches_reference_in_place(dtype, rotary_dim, assert_kernel_close):
    """Values and gradients against the reference in fp32 from the same inputs; cos/sin per batch row
    (packed positions) for full rotary, shared by the batch for partial; dims past rotary_dim untouched."""
    cos, sin = _cos_sin(dtype, rotary_dim, batch=B if rotary_dim == D else 1)
    qp, kp, q, k = _projections(dtype)
    q_before = q.detach().clone()
    data_ptr = q.data_ptr()
    q_out, k_out = apply_rope_(q, k, cos, sin, rotary_dim=rotary_dim, backend="triton")
    assert q_out is q and k_out is k and q.data_ptr() == data_ptr
    assert torch.equal(q[..., rotary_dim:], q_before[..., rotary_dim:])
    gq = torch.randn(q.shape).to(dtype)
    gk = torch.randn(k.shape).to(dtype)
    dq, dk = torch.autograd.grad((q, k), (qp, kp), (gq, gk))
    qr, kr = qp.detach().float().requires_grad_(True), kp.detach().float().requires_grad_(True)
    q_ref = (qr * 1).view(B, T, HQ, D).transpose(1, 2)
    k_ref = (kr * 1).view(B, T, HK, D).transpose(1, 2)
    reference_apply_rope_(q_ref, k_ref, cos.float(), sin.float())
    dq_ref, dk_ref = torch.autograd.grad((q_ref, k_ref), (qr, kr), (gq.float(), gk.float()))
    for name, a, b in (("q", q, q_ref), ("k", k, k_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref)):
        assert a.dtype == dtype
        assert_kernel_close(a, b, dtype, name)


def test_backward_is_the_inverse_rotation():
    """With cos/sin from a rotary module the gradient of a rotation is the rotation by -θ: rotating the
    gradient of the identity loss back gives the original q."""
    cos, sin = _cos_sin(torch.float32)
    _, _, q, k = _projections(torch.float32)
    q0 = q.detach().clone()
    apply_rope_(q, k, cos, sin, backend="triton")
    q_leaf = q0.clone().requires_grad_(True)
    qq, _ = apply_rope_(q_leaf * 1, k.detach().clone(), cos, sin, backend="triton")
    (dq,) = torch.autograd.grad(qq, q_leaf, q.detach())  # Rᵀ(R q0) = q0
    torch.testing.assert_close(dq, q0, atol=1e-5, rtol=1e-5)


def test_user_errors():
    cos, sin = _cos_sin(torch.float32)
    _, _, q, k = _projections(torch.float32)
    with pytest.raises(PeftlabError, match="rotary_dim=12 must be even"):
        apply_rope_(q, k, cos, sin, rotary_dim=12)
    with pytest.raises(PeftlabError, match="cos/sin must be"):
        apply_rope_(q, k, cos[:, :-1], sin[:, :-1])
    with pytest.raises(PeftlabError, match="k .* must match q"):
        apply_rope_(q, k[..., :-2], cos, sin)
    with pytest.raises(PeftlabError, match="must be \\(batch, heads, seq, head_dim\\)"):
        apply_rope_(q[0], k, cos, sin)


def test_aot_compile(capsys):
    """Forward and backward launches for Llama-8B heads (32 × 128, bf16) compile for sm_80/89/90 without
    register spills."""
    pytest.importorskip("triton")
    import importlib

    from peftlab.kernels.aot import assert_compiles

    reports = assert_compiles(importlib.import_module("peftlab.kernels.rope").aot_launches(torch.bfloat16),
                              capsys=capsys)
    assert len(reports) == 2 * 3 and {r.arch for r in reports} == {80, 89, 90}
    assert all(r.n_spills == 0 for r in reports), "a RoPE launch spills registers"


def test_reference_with_cos_sin_that_need_gradients():
    """cos/sin that require grad (a learned rotary table): their gradients are transformers' too."""
    cos, sin = (t.detach().requires_grad_(True) for t in _cos_sin(torch.float32))
    _, _, q, k = _projections(torch.float32)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    grads_hf = torch.autograd.grad((q_hf.sum() + k_hf.pow(2).sum()), (cos, sin))
    _, _, q2, k2 = _projections(torch.float32)
    reference_apply_rope_(q2, k2, cos, sin)
    for a, b in zip(torch.autograd.grad((q2.sum() + k2.pow(2).sum()), (cos, sin)), grads_hf, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_views_from_split_are_refused_with_the_fix(backend):
    """q/k from ``qkv.split`` cannot be modified in place under autograd (PyTorch's rule for multi-view ops):
    one clear message naming the fix instead of autograd's; slices of the same buffer work."""
    cos, sin = _cos_sin(torch.float32)
    x = torch.randn(B, T, 2 * D, requires_grad=True)
    q, k = (t.view(B, T, 1, D).transpose(1, 2) for t in (x * 1).split(D, dim=-1))
    with pytest.raises(PeftlabError, match=r"take them with slices \(qkv\[..., a:b\]\)"):
        apply_rope_(q, k, cos, sin, backend=backend)
    qkv = x * 1
    q, k = (qkv[..., i * D:(i + 1) * D].view(B, T, 1, D).transpose(1, 2) for i in range(2))
    apply_rope_(q, k, cos, sin, backend=backend)
    (dx,) = torch.autograd.grad(q.sum() + k.sum(), x)
    assert dx.shape == x.shape
