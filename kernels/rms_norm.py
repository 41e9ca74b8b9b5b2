"""RMSNorm: Triton kernels (forward, backward) + autograd Function + PyTorch reference.

Shapes: x (..., D) flattened to N rows × D; weight (D,). Per row, in fp32 whatever x's dtype::

    rstd = 1 / sqrt(mean(x²) + eps)        n = x · rstd
    y    = n · (offset + weight)           (offset = 0 for Llama/Mistral/Qwen2, 1 for Gemma/Gemma-2)

Rounding follows transformers exactly, and the two families round differently:

* Llama-style (``LlamaRMSNorm``, Mistral, Qwen2): ``weight * n.to(x.dtype)`` — n is rounded to x's dtype
  first, the product is rounded again (in the promoted dtype of weight and x, as PyTorch does);
* Gemma-style (``Gemma2RMSNorm``): ``(n * (1 + weight.float())).to(x.dtype)`` — one rounding of the fp32
  product.

``cast_before_weight`` picks the rounding; by default Llama-style when ``offset == 0`` and Gemma-style
otherwise, which is what every supported decoder does.

Backward (fp32, with g = dy·(offset + w) the gradient reaching n)::

    dx = rstd · (g - n · mean(g · n))       dw = Σ_rows dy · n

Saved for backward: x (alive anyway: it is the residual stream) and one fp32 rstd per row; autograd of
the reference keeps an fp32 copy of x and of n instead. dw is only computed when the weight requires a
gradient (LoRA/QLoRA runs freeze every norm). The Triton backward accumulates dw per program over a
slice of rows in fp32 registers and sums the (programs × D) partials once.
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

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One program normalises one row held whole in registers: D ≤ 16384 covers every decoder we load
# (Llama-3 70B: 8192). Warps = BLOCK_D / 256 (8 values per thread per live row tensor, capped at 32
# warps): ptxas (AOT test) then needs ≤ 64 registers in the backward at D=4096 and no spills anywhere,
# where 8 warps spill in the sm_90 forward at D=4096 and 4 warps spill the backward at D=8192.
MAX_BLOCK_D = 16384


def _num_warps(block_d: int) -> int:
    return min(32, max(1, block_d // 256))


def _cast_before_weight(offset: float, cast_before_weight: bool | None) -> bool:
    return offset == 0.0 if cast_before_weight is None else bool(cast_before_weight)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dtype not in _FLOAT_DTYPES and x.dtype != torch.float64:
        raise PeftlabError(f"rms_norm: x must be a float tensor, got {x.dtype}.")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise PeftlabError(
            f"rms_norm: weight must have shape ({x.shape[-1]},) = x's last dim, got {tuple(weight.shape)}."
        )
    if not eps >= 0.0:
        raise PeftlabError(f"rms_norm: eps must be >= 0, got {eps}.")


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0,
                       backend: str = "auto", cast_before_weight: bool | None = None) -> torch.Tensor:
    """Plain PyTorch RMSNorm, the op sequence of transformers' ``LlamaRMSNorm`` (``cast_before_weight``,
    the default for ``offset == 0``) or ``Gemma2RMSNorm`` (otherwise): bit for bit the same results.
    ``backend`` exists for signature parity with :func:`rms_norm` and is only validated."""
    use_triton(backend, x.device, "rms_norm")  # validates the name only
    _check(x, weight, eps)
    xf = x.to(torch.float32)
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if _cast_before_weight(offset, cast_before_weight):
        w = weight if offset == 0.0 else weight + offset
        return w * n.to(x.dtype)
    return (n * (offset + weight.float())).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, D, eps, offset,
                             CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
                             MANUAL_BF16_RNE: tl.constexpr):
        """One program per row: y[row] and rstd[row] (fp32)."""
        row = tl.program_id(0).to(tl.int64)  # int64: row·stride overflows int32 past 2^31 elements
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        n = x * rstd
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        if CAST_BEFORE_WEIGHT:  # Llama: n rounded to x's dtype, then the product rounded to y's
            n = cast_rne(n, x_ptr.dtype.element_ty, MANUAL_BF16_RNE).to(tl.float32)
        y = cast_rne(n * w, y_ptr.dtype.element_ty, MANUAL_BF16_RNE)
        tl.store(y_ptr + row * stride_y + cols, y, mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, stride_dy, stride_x, stride_dx,
                             N, D, offset, rows_per_program, CAST_BEFORE_WEIGHT: tl.constexpr,
                             COMPUTE_DW: tl.constexpr, BLOCK_D: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr):
        """Program p handles rows [p·rows_per_program, ...): dx of each row, and (COMPUTE_DW) its fp32
        partial Σ dy·n over those rows into dw_ptr[p, :]."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        start = pid.to(tl.int64) * rows_per_program  # int64: row·stride overflows int32 past 2^31
        for i in range(0, rows_per_program):  # noqa: PIE808 (interpreter-friendly form)
            row = start + i
            live = row < N  # the last program's slice may end early
            rmask = mask & live
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=rmask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + row * stride_x + cols, mask=rmask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=live, other=0.0)
            n = x * rstd
            g = dy * w
            if CAST_BEFORE_WEIGHT:
                # autograd of `w * n.to(dtype)`: the gradient of the rounded n is rounded to x's dtype
                g = cast_rne(g, x_ptr.dtype.element_ty, MANUAL_BF16_RNE).to(tl.float32)
                if COMPUTE_DW:
                    dw += dy * cast_rne(n, x_ptr.dtype.element_ty, MANUAL_BF16_RNE).to(tl.float32)
            else:
                if COMPUTE_DW:
                    dw += dy * n
            dx = rstd * (g - n * (tl.sum(g * n, axis=0) / D))
            tl.store(dx_ptr + row * stride_dx + cols, cast_rne(dx, dx_ptr.dtype.element_ty, MANUAL_BF16_RNE),
                     mask=rmask)
        if COMPUTE_DW:
            tl.store(dw_ptr + pid.to(tl.int64) * D + cols, dw, mask=mask)


def _block_d(d: int) -> int:
    block = triton.next_power_of_2(d)
    if block > MAX_BLOCK_D:
        raise PeftlabError(f"rms_norm: backend='triton' supports rows up to {MAX_BLOCK_D} values, got {d}; "
                           "use backend='torch'.")
    return block


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as N × D with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _n_programs(n_rows: int, device: torch.device) -> int:
    """Backward programs: a few per SM so each accumulates dw over many rows (few partials to sum)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 4 * sms))
    return max(1, min(n_rows, 4))  # interpreter: few programs, each over several rows (tests that loop)


def aot_launches(dtype: torch.dtype, d: int = 4096) -> list[tuple]:
    """Every (kernel, signature, constexprs, num_warps, num_stages) the dispatch launches for x, weight
    and dy of ``dtype`` with rows of ``d`` values, for the AOT compile test."""
    t = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    block, nw = _block_d(d), _num_warps(triton.next_power_of_2(d))
    fwd = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "y_ptr": f"*{t}", "rstd_ptr": "*fp32", "stride_x": "i32",
           "stride_y": "i32", "D": "i32", "eps": "fp32", "offset": "fp32"}
    bwd = {"dy_ptr": f"*{t}", "x_ptr": f"*{t}", "w_ptr": f"*{t}", "rstd_ptr": "*fp32", "dx_ptr": f"*{t}",
           "dw_ptr": "*fp32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "N": "i32",
           "D": "i32", "offset": "fp32", "rows_per_program": "i32"}
    out = []
    for cast in (True, False):
        out.append((_rms_norm_fwd_kernel, fwd, {"CAST_BEFORE_WEIGHT": cast, "BLOCK_D": block,
                                                "MANUAL_BF16_RNE": False}, nw, 1))
        for dw in (True, False):
            out.append((_rms_norm_bwd_kernel, bwd, {"CAST_BEFORE_WEIGHT": cast, "COMPUTE_DW": dw,
                                                    "BLOCK_D": block, "MANUAL_BF16_RNE": False}, nw, 1))
    return out


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm; saves x and the per-row rstd only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                cast_before_weight: bool) -> torch.Tensor:
        x2 = _rows(x)
        n_rows, d = x2.shape
        block = _block_d(d)
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if cast_before_weight else x.dtype
        y = torch.empty((n_rows, d), dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows:
            _rms_norm_fwd_kernel[(n_rows,)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), d, float(eps), float(offset),
                CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_D=block, MANUAL_BF16_RNE=triton_is_interpreted(),
                num_warps=_num_warps(block), num_stages=1,
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.cast_before_weight, ctx.x_shape = float(offset), cast_before_weight, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, d = x2.shape
        dy2 = _rows(dy)
        block = _block_d(d)
        compute_dw = bool(ctx.needs_input_grad[1])
        dx = torch.empty_like(x2)
        programs = _n_programs(n_rows, x2.device)
        rows_per_program = triton.cdiv(n_rows, programs) if n_rows else 0
        dw_partial = torch.empty((programs, d) if compute_dw else (1,), dtype=torch.float32, device=x2.device)
        if n_rows:
            _rms_norm_bwd_kernel[(programs,)](
                dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, d,
                ctx.offset, rows_per_program, CAST_BEFORE_WEIGHT=ctx.cast_before_weight, COMPUTE_DW=compute_dw,
                BLOCK_D=block, MANUAL_BF16_RNE=triton_is_interpreted(), num_warps=_num_warps(block), num_stages=1,
            )
        dw = None
        if compute_dw:
            dw = (dw_partial.sum(0) if n_rows else torch.zeros(d, device=x2.device)).to(weight.dtype)
        return dx.view(ctx.x_shape), dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0, backend: str = "auto",
             cast_before_weight: bool | None = None) -> torch.Tensor:
    """RMSNorm of the last dim: ``x / sqrt(mean(x²) + eps) · (offset + weight)``, variance in fp32.

    ``offset=1.0`` for Gemma/Gemma-2 (their weight is stored as w - 1). Output in x's dtype (Llama-style
    rounding with a wider weight: the promoted dtype, as transformers). No weight gradient is computed
    when ``weight.requires_grad`` is False. ``backend``: "auto" = Triton on CUDA tensors, the PyTorch
    reference elsewhere; "triton" forces the kernels (CPU tensors under ``TRITON_INTERPRET=1``);
    "torch" forces the reference. ``cast_before_weight``: see the module docstring.
    """
    _check(x, weight, eps)
    if not use_triton(backend, x.device, "rms_norm"):
        return reference_rms_norm(x, weight, eps, offset=offset, cast_before_weight=cast_before_weight)
    if x.dtype == torch.float64 or weight.dtype == torch.float64:
        raise PeftlabError("rms_norm: the Triton backend does not support float64 inputs; use backend='torch'.")
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), _cast_before_weight(offset, cast_before_weight))
