"""SwiGLU ``silu(gate) · up``: Triton kernels (forward, in-place backward) + autograd Function + reference.

Shapes: gate and up (..., I) — the gate_proj / up_proj outputs of a gated MLP — flattened to N × I rows
(any row stride, unit column stride: halves of one fused gate_up GEMM output work as they are).

Forward, in fp32 with one rounding to the inputs' dtype::

    h = silu(g) · u = g · σ(g) · u

Backward: with dh the incoming gradient and σ = sigmoid(g)::

    dg = dh · u · σ · (1 + g · (1 - σ))        du = dh · g · σ

Memory: the Function saves gate and up — the two activations autograd would keep anyway — and its
backward writes dg over gate's buffer and du over up's buffer (one kernel reads g, u, dh and writes
both), so backward allocates nothing of the MLP's width. The buffers are therefore consumed: a second
backward through the same graph (``retain_graph=True``) is refused with a clear error, and the version
counters of gate and up are bumped so that any other op that saved them fails loudly instead of reading
gradients. Reference: transformers' ``act_fn(gate) * up`` (two roundings in bf16) + plain autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError

from .nf4 import cast_rne, triton_is_interpreted, use_triton

try:  # Triton is a Linux-only dependency; the reference works without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    _HAS_TRITON = False

# Elementwise: 1024 values per program over 4 warps = 8 per thread per live tensor (5 live in backward).
BLOCK = 1024
NUM_WARPS = 4


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise PeftlabError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape.")
    if gate.dtype != up.dtype or not gate.is_floating_point():
        raise PeftlabError(f"swiglu: gate and up must be float tensors of one dtype, got {gate.dtype} and "
                           f"{up.dtype}.")


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """transformers' gated MLP activation ``F.silu(gate) * up`` (bit for bit) with plain autograd.
    ``backend`` exists for signature parity with :func:`swiglu` and is only validated."""
    use_triton(backend, gate.device, "swiglu")  # validates the name only
    _check(gate, up)
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, stride_g, stride_u, stride_h, I,
                           BLOCK: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr):
        """Grid (rows, cdiv(I, BLOCK))."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + row * stride_h + cols, cast_rne(h, h_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, stride_dh, stride_g, stride_u, I,
                           BLOCK: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr):
        """dg over g's buffer, du over u's buffer; every element is read before it is written."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        dh = tl.load(dh_ptr + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        du = dh * silu
        tl.store(g_ptr + row * stride_g + cols, cast_rne(dg, g_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)
        tl.store(u_ptr + row * stride_u + cols, cast_rne(du, u_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)


def aot_launches(dtype: torch.dtype) -> list[tuple]:
    """The forward and backward launches for gate/up/dh of ``dtype``, for the AOT compile test."""
    t = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    cx = {"BLOCK": BLOCK, "MANUAL_BF16_RNE": False}
    fwd = {"g_ptr": f"*{t}", "u_ptr": f"*{t}", "h_ptr": f"*{t}", "stride_g": "i32", "stride_u": "i32",
           "stride_h": "i32", "I": "i32"}
    bwd = {"dh_ptr": f"*{t}", "g_ptr": f"*{t}", "u_ptr": f"*{t}", "stride_dh": "i32", "stride_g": "i32",
           "stride_u": "i32", "I": "i32"}
    return [(_swiglu_fwd_kernel, fwd, cx, NUM_WARPS, 1), (_swiglu_bwd_kernel, bwd, cx, NUM_WARPS, 1)]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as N × I with unit column stride: a view when the layout allows, else a copy."""
    try:
        t2 = t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1]).contiguous()
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _extent(t: torch.Tensor) -> tuple[int, int]:
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1 if t.numel() else 0
    return t.storage_offset(), t.storage_offset() + span


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two N × I row views (unit column stride) share an element. Halves of one fused gate_up
    output interleave row by row without sharing one: same row stride s, offsets d apart, they meet iff
    some row shift k (|k| < N) brings d + k·s within the width."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or not (a.numel() and b.numel()):
        return False
    if a.element_size() != b.element_size():
        return True  # not views of one activation: be safe
    n, width = a.shape
    s = a.stride(0)
    if b.shape == a.shape and b.stride(0) == s and s >= width and n > 0:
        d = b.storage_offset() - a.storage_offset()
        if s == 0:
            return abs(d) < width
        for k in (-d // s, -(d // s)):  # floor and ceil of -d/s
            k = max(-(n - 1), min(n - 1, k))
            if abs(d + k * s) < width:
                return True
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


class SwiGLUFunction(torch.autograd.Function):
    """Triton SwiGLU whose backward overwrites the saved gate/up buffers with their gradients."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g2, u2 = _rows(gate), _rows(up)
        if _overlap(g2, u2):  # the in-place backward needs two separate buffers
            u2 = u2.clone()
        n_rows, width = g2.shape
        h = torch.empty((n_rows, width), dtype=gate.dtype, device=gate.device)
        if h.numel():
            _swiglu_fwd_kernel[(n_rows, triton.cdiv(width, BLOCK))](
                g2, u2, h, g2.stride(0), u2.stride(0), h.stride(0), width, BLOCK=BLOCK,
                MANUAL_BF16_RNE=triton_is_interpreted(), num_warps=NUM_WARPS, num_stages=1,
            )
        ctx.save_for_backward(g2, u2)
        ctx.shape, ctx.consumed = gate.shape, False
        return h.view(gate.shape)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        if ctx.consumed:
            raise PeftlabError(
                "swiglu: its backward ran twice on one graph (retain_graph=True?). The Triton backward writes "
                "the gradients over the saved gate/up activations, so they are gone after the first backward; "
                "use backend='torch' (peftlab.kernels.reference_swiglu) where a graph is backpropagated twice."
            )
        g2, u2 = ctx.saved_tensors
        ctx.consumed = True
        dh2 = _rows(dh)
        n_rows, width = g2.shape
        if g2.numel():
            _swiglu_bwd_kernel[(n_rows, triton.cdiv(width, BLOCK))](
                dh2, g2, u2, dh2.stride(0), g2.stride(0), u2.stride(0), width, BLOCK=BLOCK,
                MANUAL_BF16_RNE=triton_is_interpreted(), num_warps=NUM_WARPS, num_stages=1,
            )
        # the buffers now hold gradients: any other op that saved them must fail its version check
        torch.autograd.graph.increment_version(g2)
        torch.autograd.graph.increment_version(u2)
        return g2.view(ctx.shape), u2.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) · up`` (the gated-MLP activation of Llama/Mistral/Qwen2), output in gate's dtype.

    ``backend``: "auto" = Triton on CUDA tensors (backward in place over gate/up: see the module
    docstring), the reference elsewhere; "triton" forces the kernels (CPU under ``TRITON_INTERPRET=1``);
    "torch" forces the reference.
    """
    _check(gate, up)
    if not use_triton(backend, gate.device, "swiglu"):
        return reference_swiglu(gate, up)
    if gate.dtype == torch.float64:
        raise PeftlabError("swiglu: the Triton backend does not support float64 inputs; use backend='torch'.")
    return SwiGLUFunction.apply(gate, up)
