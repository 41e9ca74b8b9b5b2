"""Rotary position embeddings applied IN PLACE to q and k: Triton kernel + autograd Function + reference.

Shapes (transformers' attention layout): q (B, Hq, T, D), k (B, Hk, T, D) — any strides with a unit
stride on D, so ``proj(x).view(B, T, H, D).transpose(1, 2)`` is rotated where it lies, without a copy;
cos, sin (B or 1, T, R) exactly as the model's rotary-embedding module returns them (Llama-3 / YaRN /
dynamic scaling are already folded into them). R = rotary_dim ≤ D, even; only the first R dims of each
head rotate (partial rotary), the rest pass through untouched.

rotate_half convention (transformers' ``apply_rotary_pos_emb``), with h = R/2 and i < h::

    out[i]     = x[i]   · cos[i]   - x[i+h] · sin[i]
    out[i+h]   = x[i+h] · cos[i+h] + x[i]   · sin[i+h]

Backward is the transpose of that 2×2 map per pair (the inverse rotation when cos/sin repeat over the two
halves, as every rotary module builds them)::

    dx[i]   = g[i] · cos[i]   + g[i+h] · sin[i+h]
    dx[i+h] = g[i+h] · cos[i+h] - g[i] · sin[i]

so nothing but cos/sin is saved: autograd of the reference keeps q and k (or their rotated halves) alive.
The kernel computes in fp32 and rounds once; transformers rounds after each of its three ops in bf16, so
bf16 results differ from the reference by rounding only (see tests/kernels/test_rope.py for tolerances).
"""
from __future__ import annotations

import torch

from peftlab.errors import PeftlabError

from .nf4 import cast_rne, triton_is_interpreted, use_triton

try:  # Triton is a Linux-only dependency; the reference works without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    _HAS_TRITON = False

# A program rotates BLOCK_H heads × BLOCK_HALF pairs per step: ≤ 1024 pairs over 4 warps is 8 pairs per
# thread: 64 registers on sm_80/90, no spills (AOT test); 2048 pairs needs 128.
MAX_PAIRS_PER_STEP = 1024


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None) -> int:
    """The rotary dim R after checking every shape; PeftlabError naming the mismatch otherwise."""
    if q.dim() != 4 or k.dim() != 4:
        raise PeftlabError(f"apply_rope_: q and k must be (batch, heads, seq, head_dim), got {tuple(q.shape)} "
                           f"and {tuple(k.shape)}.")
    b, _, t, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, t, d):
        raise PeftlabError(f"apply_rope_: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and "
                           "head_dim (only the head count may differ: grouped-query attention).")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, b) or cos.shape[1] != t:
        raise PeftlabError(f"apply_rope_: cos/sin must be (batch or 1, seq, rotary_dim) = ({b} or 1, {t}, R) as "
                           f"the rotary embedding module returns them, got {tuple(cos.shape)} and "
                           f"{tuple(sin.shape)}.")
    r = cos.shape[-1] if rotary_dim is None else int(rotary_dim)
    if r != cos.shape[-1] or r % 2 or not 0 < r <= d:
        raise PeftlabError(f"apply_rope_: rotary_dim={r} must be even, ≤ head_dim={d} and equal cos.shape[-1]="
                           f"{cos.shape[-1]}.")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise PeftlabError(f"apply_rope_: q and k must be float tensors, got {q.dtype} and {k.dtype}.")
    return r


def reference_apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                          rotary_dim: int | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (``unsqueeze_dim=1``; partial rotary as its Phi/StableLM
    models do it: rotate the first R dims, pass the rest), the result copied back into q and k.

    Same ops in the same dtype as transformers, so the values are bit for bit its values. Autograd tracks
    the in-place copies (q and k must not be leaves that require grad). ``backend`` is only validated."""
    use_triton(backend, q.device, "apply_rope_")  # validates the name only
    r = _check(q, k, cos, sin, rotary_dim)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    # autograd saves the rotated tensor itself only when cos/sin need gradients (mul saves the other
    # factor); then it must not be the tensor the copy overwrites
    keep = cos.requires_grad or sin.requires_grad
    for x in (q, k):
        rot = x[..., :r]
        src = rot.clone() if keep else rot
        rot.copy_(src * c + _rotate_half(src) * s)
    return q, k


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, sxb, sxh, sxt, scb, sct, n_heads, T, HALF,
                     BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     MANUAL_BF16_RNE: tl.constexpr):
        """One program per (batch, position): rotate the first 2·HALF dims of every head, in place."""
        pid = tl.program_id(0)
        b = (pid // T).to(tl.int64)
        t = (pid % T).to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)
        jm = j < HALF
        cbase = b * scb + t * sct  # scb = 0 when cos is shared by the batch
        c_lo = tl.load(cos_ptr + cbase + j, mask=jm, other=0.0).to(tl.float32)
        c_hi = tl.load(cos_ptr + cbase + HALF + j, mask=jm, other=0.0).to(tl.float32)
        s_lo = tl.load(sin_ptr + cbase + j, mask=jm, other=0.0).to(tl.float32)
        s_hi = tl.load(sin_ptr + cbase + HALF + j, mask=jm, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the forward 2×2 map
            a_lo, b_lo, a_hi, b_hi = c_lo, s_hi, c_hi, -s_lo
        else:
            a_lo, b_lo, a_hi, b_hi = c_lo, -s_lo, c_hi, s_hi
        base = x_ptr + b * sxb + t * sxt
        for h0 in range(0, n_heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            m = (h < n_heads)[:, None] & jm[None, :]
            p = base + h.to(tl.int64)[:, None] * sxh + j[None, :]
            x_lo = tl.load(p, mask=m, other=0.0).to(tl.float32)
            x_hi = tl.load(p + HALF, mask=m, other=0.0).to(tl.float32)
            o_lo = x_lo * a_lo[None, :] + x_hi * b_lo[None, :]
            o_hi = x_hi * a_hi[None, :] + x_lo * b_hi[None, :]
            tl.store(p, cast_rne(o_lo, x_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=m)
            tl.store(p + HALF, cast_rne(o_hi, x_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=m)


def _launch_config(n_heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps)."""
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(n_heads), MAX_PAIRS_PER_STEP // block_half))
    return block_h, block_half, 4


def aot_launches(dtype: torch.dtype, n_heads: int = 32, head_dim: int = 128) -> list[tuple]:
    """The kernel launches (forward and backward) for q of ``n_heads`` × ``head_dim`` in ``dtype`` with
    cos/sin in the same dtype, for the AOT compile test."""
    t = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    block_h, block_half, nw = _launch_config(n_heads, head_dim // 2)
    sig = {"x_ptr": f"*{t}", "cos_ptr": f"*{t}", "sin_ptr": f"*{t}", "sxb": "i32", "sxh": "i32", "sxt": "i32",
           "scb": "i32", "sct": "i32", "n_heads": "i32", "T": "i32", "HALF": "i32"}
    return [(_rope_kernel, sig, {"BACKWARD": bw, "BLOCK_H": block_h, "BLOCK_HALF": block_half,
                                 "MANUAL_BF16_RNE": False}, nw, 1) for bw in (False, True)]


def _rope_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int, backward: bool) -> None:
    b, n_heads, t, _ = x.shape
    if b * t == 0 or n_heads == 0:
        return
    block_h, block_half, nw = _launch_config(n_heads, half)
    _rope_kernel[(b * t,)](
        x, cos, sin, x.stride(0), x.stride(1), x.stride(2), cos.stride(0) if cos.shape[0] > 1 else 0,
        cos.stride(1), n_heads, t, half, BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half,
        MANUAL_BF16_RNE=triton_is_interpreted(), num_warps=nw, num_stages=1,
    )


class RopeFunction(torch.autograd.Function):
    """In-place rotation of one of q / k; saves cos and sin only. One tensor per Function: autograd
    refuses a Function that modifies an input view in place and returns more than one tensor, and q/k
    are views of their projections' outputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
        _rope_inplace(x, cos, sin, half, backward=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.half = half
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        # a fresh buffer: the incoming gradient may be shared with another consumer of q/k
        g = g.clone() if g.stride(-1) == 1 else g.contiguous()
        _rope_inplace(g, cos, sin, ctx.half, backward=True)
        return g, None, None, None


def _prepare_cos_sin(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                rotary_dim: int | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) in place by cos/sin (B or 1, T, R); return (q, k).

    Values of transformers' ``apply_rotary_pos_emb`` (see the module docstring). Autograd-correct: the
    backward is the inverse rotation of the gradient and saves nothing but cos/sin; q and k must not be
    leaves that require grad (as for any in-place op). ``backend``: "auto" = Triton on CUDA tensors, the
    reference elsewhere; "triton" forces the kernel (CPU under ``TRITON_INTERPRET=1``); "torch" the reference.
    """
    r = _check(q, k, cos, sin, rotary_dim)
    try:
        return _apply_rope_(q, k, cos, sin, r, backend)
    except RuntimeError as exc:
        if "returns multiple views" not in str(exc):
            raise
        raise PeftlabError(
            "apply_rope_: q/k are views made by an op that returns several views at once (split, chunk, unbind, "
            "or a custom autograd Function returning views of one buffer), which autograd cannot modify in "
            "place; take them with slices (qkv[..., a:b]) or from separate tensors."
        ) from exc


def _apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, r: int,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(backend, q.device, "apply_rope_"):
        return reference_apply_rope_(q, k, cos, sin, rotary_dim=r)
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise PeftlabError("apply_rope_: q and k need a unit stride on head_dim for the in-place kernel "
                           "(a view of a projection output has one); use backend='torch' otherwise.")
    if torch.float64 in (q.dtype, k.dtype):
        raise PeftlabError("apply_rope_: the Triton backend does not support float64 inputs; use backend='torch'.")
    cos, sin = _prepare_cos_sin(cos), _prepare_cos_sin(sin)
    return RopeFunction.apply(q, cos, sin, r // 2), RopeFunction.apply(k, cos, sin, r // 2)
