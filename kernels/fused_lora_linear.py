"""Fused (Q)LoRA linear: ``y = x·dequant(W)ᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`` forward and backward.

Why: in QLoRA every frozen linear dequantises its 4-bit weight to 16-bit in global memory, multiplies, and
then the LoRA branch does two more small matmuls plus an add over the full ``(tokens, out)`` output. Here
the NF4/FP4 codes are dequantised inside the GEMM's W tile loads (the 16-bit W never exists in global
memory, in the forward nor in the backward) and the LoRA up-projection is an epilogue ``tl.dot`` on the
accumulator, so the ``(tokens, out)`` LoRA output is never written either.

Shapes (x flattened to 2-D): x ``(M, K)`` with ``K = in_features``, W ``(N, K)`` (bitsandbytes packs it
row-major, two codes per byte), lora_A ``(r, K)``, lora_B ``(N, r)``, y ``(M, N)``.

* forward:  ``xa = drop(x)·Aᵀ`` (M×r, one small torch matmul: we need it for dB anyway, and a single read of
  x for it is cheaper than recomputing it in every N-tile of the GEMM); Triton GEMM ``x·Wᵀ`` with
  in-tile dequant, epilogue ``+ s·xa·Bᵀ + bias``.
* backward: ``g = dy·B`` (M×r); Triton GEMM ``dx = dy·W`` with in-tile dequant, epilogue
  ``+ (s·g·A) ⊙ mask/(1-p)``; ``dA = s·gᵀ·drop(x)``, ``dB = s·dyᵀ·xa`` (small-output torch matmuls).
  The r-sized side matmuls (xa, g, dA, dB) accumulate and return fp32 (see :func:`matmul_f32`).
  Saved for backward: x (already alive in autograd), xa (M×r fp32), the dropout mask (1 byte/element).
  W and bias of the base layer are frozen: W never gets a gradient (a trainable 16-bit base weight is a
  PeftlabError, never silently ignored); a bias that requires grad does get ``dy.sum(0)``.
* dropout: the mask is drawn in PyTorch with the torch RNG (same draw on every backend, deterministic for a
  seed) or passed as ``dropout_mask`` (bool, x's shape); ``drop(x) = x * (mask / (1-p))`` like
  ``nn.Dropout``.

The compute dtype is ``x.dtype``: the 4-bit weight is dequantised in ``quant_state.dtype`` (bit-exact
bitsandbytes) and cast to ``x.dtype``, as ``bnb.matmul_4bit`` does; the LoRA branch runs in the LoRA weights'
dtype (``x`` is cast to it, as PEFT does), accumulations are fp32 everywhere in the kernels, and the output
has ``x.dtype``. Callers that want bitsandbytes' ``compute_dtype`` cast x first.

``backend``: "auto" = Triton on CUDA, the PyTorch reference elsewhere; "triton" forces Triton (CPU tensors
work under ``TRITON_INTERPRET=1``); "torch" forces :func:`reference_lora_linear`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError

from .nf4 import (
    _HAS_TRITON,
    dequantize_4bit,
    nf4_dequantize,
    quant_kernel_args,
    triton_is_interpreted,
    use_triton,
)

if _HAS_TRITON:
    import triton
    import triton.language as tl

    from .nf4 import _load_nf4_values, cast_rne

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# how the kernels round the fp32 dequantised weight before casting it to the compute dtype
_W_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ------------------------------------------------------------------------------------ launch configs
@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of the fused GEMMs (the single source for dispatch and AOT tests)."""

    BLOCK_M: int
    BLOCK_N: int  # forward: output columns; backward dx: the reduction (out_features) step
    BLOCK_K: int  # forward: the reduction (in_features) step; backward dx: output columns
    GROUP_M: int
    num_warps: int
    num_stages: int


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype, quantized: bool) -> GemmConfig:
    """Tile sizes for a (M×K)·(K×N) GEMM in ``dtype``; the same table serves forward and backward-dx.

    16-bit: 128×128 output tiles with K-steps of 64 (dense) or 32 (4-bit: each W element costs a byte load,
    a code-book gather and a scale gather in registers). Known: with these tiles the 4-bit GEMMs reach 255
    registers and spill a little on sm_80/89/90 (AOT test report; smaller tiles spill more, the per-element
    64-bit gather addresses dominate) — the next step is a packed [BN, BK/2] byte load + per-row scales.
    fp32 runs IEEE FMA dots: 64×64 tiles. Small M (decode,
    tests) shrinks BLOCK_M so a 16-token batch does not waste 7/8 of every tile. All dot dims stay >= 16.
    """
    if dtype == torch.float32:
        bm = 64 if M > 32 else (32 if M > 16 else 16)
        return GemmConfig(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    bm = 128 if M > 64 else (64 if M > 32 else (32 if M > 16 else 16))
    bk = 32 if quantized else 64
    return GemmConfig(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8, num_warps=8 if bm == 128 else 4,
                      num_stages=3)


def lora_block_r(r: int) -> int:
    """LoRA rank padded to a power of two >= 16 (tl.dot needs every dim >= 16; padding is masked)."""
    return max(16, 1 << max(0, (int(r) - 1).bit_length()))


# ------------------------------------------------------------------------------------ triton kernels
if _HAS_TRITON:

    @triton.jit
    def _w_tile(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, rows, cols, mask, stride_wn, K,
                DST: tl.constexpr, QUANT: tl.constexpr, W_ROUND: tl.constexpr, LOG2_BS: tl.constexpr,
                LOG2_BS2: tl.constexpr, NESTED: tl.constexpr, INTERPRETER: tl.constexpr):
        """W[rows, cols] in the compute dtype; rows/cols are broadcastable int64 index tiles (n and k).

        4-bit: element (n, k) is flat index n*K + k of bitsandbytes' row-major packing; dequantised to fp32,
        rounded to quant_state.dtype (W_ROUND) as bitsandbytes returns it, then cast to the compute dtype.
        """
        if QUANT:
            w = _load_nf4_values(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, rows * K + cols,
                                 mask, LOG2_BS, LOG2_BS2, NESTED)
            if W_ROUND == 1:
                w = w.to(tl.float16)
            elif W_ROUND == 2:
                w = cast_rne(w, tl.bfloat16, INTERPRETER)
        else:
            w = tl.load(w_ptr + rows * stride_wn + cols, mask=mask, other=0.0)
        if w.dtype != DST:
            w = cast_rne(w.to(tl.float32), DST, INTERPRETER)
        return w

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
        """acc + a·b with an fp32 accumulator.

        The Triton 3.6 interpreter stores bf16 as uint16 and multiplies the raw integers in tl.dot, so under
        the interpreter both operands go to fp32 first (exact); compiled code uses the 16-bit tensor cores.
        """
        if INTERPRETER:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        # L2-friendly order: GROUP_M row-tiles sweep the column tiles together (W tiles reused from L2)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _fused_lora_fwd_kernel(
        x_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, bias_ptr, xa_ptr, b_ptr, y_ptr,
        M, N, K, R, stride_xm, stride_wn, stride_xam, stride_bn, stride_ym, scaling,
        QUANT: tl.constexpr, W_ROUND: tl.constexpr, LOG2_BS: tl.constexpr, LOG2_BS2: tl.constexpr,
        NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, DOT_PRECISION: tl.constexpr,
        LORA_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, INTERPRETER: tl.constexpr,
    ):
        """y[M, N] = x[M, K]·W[N, K]ᵀ (+ scaling·xa[M, R]·B[N, R]ᵀ) (+ bias[N]); fp32 accumulator."""
        pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m.to(tl.int64)  # int64 row offsets: M*K passes 2^31 at 16k tokens x 14336
        rn = offs_n.to(tl.int64)
        m_ok = offs_m < M
        n_ok = offs_n < N
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):  # noqa: PIE808 (interpreter-friendly form)
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            # W tile [BLOCK_N, BLOCK_K]: contiguous along k in memory (and in the packed bytes)
            w = _w_tile(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, rn[:, None],
                        offs_k[None, :].to(tl.int64), n_ok[:, None] & k_ok[None, :], stride_wn, K, dt, QUANT,
                        W_ROUND, LOG2_BS, LOG2_BS2, NESTED, INTERPRETER)
            acc = _dot(x, tl.trans(w), acc, DOT_PRECISION, INTERPRETER)
        if HAS_LORA:
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            xa = tl.load(xa_ptr + rm[:, None] * stride_xam + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :],
                         other=0.0)
            b = tl.load(b_ptr + rn[:, None] * stride_bn + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :],
                        other=0.0)
            acc += scaling * _dot(xa, tl.trans(b.to(xa.dtype)), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                                  LORA_PRECISION, INTERPRETER)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = cast_rne(acc, y_ptr.dtype.element_ty, INTERPRETER)
        tl.store(y_ptr + rm[:, None] * stride_ym + offs_n[None, :], out, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _fused_lora_bwd_dx_kernel(
        dy_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, g_ptr, a_ptr, mask_ptr, dx_ptr,
        M, N, K, R, stride_dym, stride_wn, stride_gm, stride_ar, stride_maskm, stride_dxm, lora_scale,
        QUANT: tl.constexpr, W_ROUND: tl.constexpr, LOG2_BS: tl.constexpr, LOG2_BS2: tl.constexpr,
        NESTED: tl.constexpr, HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
        LORA_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, INTERPRETER: tl.constexpr,
    ):
        """dx[M, K] = dy[M, N]·W[N, K] (+ (lora_scale·g[M, R]·A[R, K]) ⊙ mask[M, K]); fp32 accumulator.

        lora_scale = scaling / (1 - p) when a dropout mask is given (the mask holds 0/1).
        """
        pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rm = offs_m.to(tl.int64)
        rk = offs_k.to(tl.int64)
        m_ok = offs_m < M
        k_ok = offs_k < K
        dt = dy_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for nb in range(0, tl.cdiv(N, BLOCK_N)):  # noqa: PIE808
            offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            dy = tl.load(dy_ptr + rm[:, None] * stride_dym + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                         other=0.0)
            # W tile [BLOCK_N, BLOCK_K] used as is (no transpose): dx = dy·W
            w = _w_tile(w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, offs_n[:, None].to(tl.int64),
                        rk[None, :], n_ok[:, None] & k_ok[None, :], stride_wn, K, dt, QUANT, W_ROUND, LOG2_BS,
                        LOG2_BS2, NESTED, INTERPRETER)
            acc = _dot(dy, w, acc, DOT_PRECISION, INTERPRETER)
        if HAS_LORA:
            offs_r = tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            g = tl.load(g_ptr + rm[:, None] * stride_gm + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :],
                        other=0.0)
            a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * stride_ar + rk[None, :],
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            lora = lora_scale * _dot(g, a.to(g.dtype), tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), LORA_PRECISION,
                                     INTERPRETER)
            if HAS_MASK:
                keep = tl.load(mask_ptr + rm[:, None] * stride_maskm + rk[None, :],
                               mask=m_ok[:, None] & k_ok[None, :], other=0)
                lora = tl.where(keep != 0, lora, 0.0)
            acc += lora
        out = cast_rne(acc, dx_ptr.dtype.element_ty, INTERPRETER)
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :], out, mask=m_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------- base-layer access
@dataclasses.dataclass
class _Base:
    """What the kernels need from the frozen base layer (references only, no copies)."""

    in_features: int
    out_features: int
    weight: torch.Tensor  # dense (N, K) weight, or bitsandbytes' packed Params4bit
    quant_state: Any  # None for a dense base
    bias: torch.Tensor | None

    @property
    def quantized(self) -> bool:
        return self.quant_state is not None


def _describe_base(base_layer: torch.nn.Module) -> _Base:
    weight = getattr(base_layer, "weight", None)
    if weight is None:
        raise PeftlabError(f"fused_lora_linear needs a base layer with a weight, got {type(base_layer).__name__}.")
    bias = getattr(base_layer, "bias", None)
    quant_state = getattr(weight, "quant_state", None) or getattr(base_layer, "quant_state", None)
    is_4bit = type(weight).__name__ == "Params4bit"
    if is_4bit:
        if quant_state is None:
            raise PeftlabError(
                f"{type(base_layer).__name__}.weight is a bitsandbytes Params4bit that is not quantised yet "
                "(no quant_state). Quantise it first: move the layer to its device (`layer.to(device)`), or "
                "load the model with a BitsAndBytesConfig(load_in_4bit=True)."
            )
        n, k = (int(s) for s in quant_state.shape)
        return _Base(in_features=k, out_features=n, weight=weight, quant_state=quant_state, bias=bias)
    if not isinstance(base_layer, torch.nn.Linear):
        raise PeftlabError(
            f"fused_lora_linear supports torch.nn.Linear and bitsandbytes Linear4bit bases, got "
            f"{type(base_layer).__name__}; use PEFT's own LoRA layer for other base types."
        )
    if weight.dtype not in _FLOAT_DTYPES:
        raise PeftlabError(f"base layer weight dtype {weight.dtype} is not float16/bfloat16/float32.")
    return _Base(in_features=weight.shape[1], out_features=weight.shape[0], weight=weight, quant_state=None,
                 bias=bias)


def _validate(x: torch.Tensor, base: _Base, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise PeftlabError(f"x must be float16/bfloat16/float32, got {x.dtype}.")
    if x.shape[-1] != base.in_features:
        raise PeftlabError(f"x has {x.shape[-1]} features but the base layer expects in_features={base.in_features}.")
    r = lora_A.shape[0] if lora_A.dim() == 2 else -1
    if lora_A.dim() != 2 or lora_A.shape[1] != base.in_features:
        raise PeftlabError(f"lora_A must be (r, in_features={base.in_features}), got {tuple(lora_A.shape)}.")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (base.out_features, r):
        raise PeftlabError(
            f"lora_B must be (out_features={base.out_features}, r={r}), got {tuple(lora_B.shape)}."
        )
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in _FLOAT_DTYPES:
        raise PeftlabError(
            f"lora_A and lora_B must share one float dtype, got {lora_A.dtype} and {lora_B.dtype}."
        )
    if not base.quantized and base.weight.requires_grad and torch.is_grad_enabled():
        raise PeftlabError(
            "the base layer's weight requires grad, but fused_lora_linear treats the base layer as frozen (it "
            "trains only lora_A and lora_B). Freeze it with `base_layer.weight.requires_grad_(False)`."
        )
    for t, name in ((lora_A, "lora_A"), (lora_B, "lora_B"), (base.weight, "base weight")):
        if t.device != x.device:
            raise PeftlabError(f"{name} is on {t.device} but x is on {x.device}; move them to one device.")


def resolve_dropout_mask(x: torch.Tensor, dropout_p: float, training: bool,
                         dropout_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The bool keep-mask of the LoRA input dropout, or None when dropout is inactive.

    Drawn with the torch RNG (``bernoulli(1 - p)``) when not given, so every backend draws the same mask for
    a seed. A mask given while dropout is inactive is an error (it would otherwise be ignored silently).
    """
    if not 0.0 <= float(dropout_p) < 1.0:
        raise PeftlabError(f"dropout_p must be in [0, 1), got {dropout_p}.")
    active = bool(training) and dropout_p > 0.0
    if not active:
        if dropout_mask is not None:
            raise PeftlabError(
                "dropout_mask was given but dropout is inactive (training=False or dropout_p=0), so it would be "
                "ignored; pass training=True and dropout_p>0, or drop the mask."
            )
        return None
    if dropout_mask is None:
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - float(dropout_p))
    if tuple(dropout_mask.shape) != tuple(x.shape):
        raise PeftlabError(f"dropout_mask must have x's shape {tuple(x.shape)}, got {tuple(dropout_mask.shape)}.")
    return dropout_mask.to(device=x.device) != 0


def _apply_dropout(x: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """``x * (mask / (1 - p))`` in x's dtype, the way ``nn.Dropout`` scales kept elements."""
    if mask is None:
        return x
    return x * (mask.to(x.dtype) / (1.0 - p))


# --------------------------------------------------------------------------------------- reference
def dequantize_base_weight(base: _Base, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a (N, K) tensor in ``dtype`` — bitsandbytes' dequant, once, no extra copies.

    :func:`peftlab.kernels.nf4.dequantize_4bit`: bitsandbytes' fast C/CUDA kernels with peftlab's conventions
    (the bit-exact reference where bitsandbytes 0.50 is wrong on CPU; FP4's negative zero kept).
    """
    if not base.quantized:
        w = base.weight.detach()
        return w if w.dtype == dtype else w.to(dtype)
    w = dequantize_4bit(base.weight.data, base.quant_state)
    return w if w.dtype == dtype else w.to(dtype)


class _FrozenBaseMatmul(torch.autograd.Function):
    """``x·Wᵀ`` for a frozen base: W is dequantised in forward and again in backward, never saved.

    Keeping a dequantised 16-bit W alive from forward to backward (what plain autograd would do) costs as
    much memory per layer as an unquantised model; bitsandbytes' own MatMul4Bit re-dequantises the same way.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: _Base) -> torch.Tensor:  # type: ignore[override]
        ctx.base = base
        return F.linear(x, dequantize_base_weight(base, x.dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return torch.matmul(dy, dequantize_base_weight(ctx.base, dy.dtype)), None


def reference_lora_linear(x: torch.Tensor, base_layer: torch.nn.Module, lora_A: torch.Tensor,
                          lora_B: torch.Tensor, scaling: float, *, dropout_p: float = 0.0, training: bool = False,
                          dropout_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Plain-PyTorch (Q)LoRA linear with the signature of :func:`fused_lora_linear` (autograd does backward).

    ``base(x) + s·B(A(drop(x)))`` as PEFT computes it (LoRA branch in the LoRA dtype, result in x's dtype);
    the base weight is dequantised by bitsandbytes once per forward and once per backward. ``backend`` is
    accepted for signature parity and ignored.
    """
    base = _describe_base(base_layer)
    _validate(x, base, lora_A, lora_B)
    mask = resolve_dropout_mask(x, dropout_p, training, dropout_mask)
    y = _FrozenBaseMatmul.apply(x, base)
    if base.bias is not None:
        y = y + base.bias.to(y.dtype)
    xd = _apply_dropout(x, mask, dropout_p).to(lora_A.dtype)
    lora = F.linear(F.linear(xd, lora_A), lora_B) * scaling
    return (y + lora.to(y.dtype)).to(x.dtype)


# ------------------------------------------------------------------------------------------ triton path
def _precision(dtype: torch.dtype) -> str:
    # fp32 dots must be IEEE: tf32 would break fp32 parity (1e-5) on Ampere+; ignored for 16-bit inputs.
    # The LoRA epilogue (fp32 xa/g, rank-sized reduction) uses the compute dtype's rule too: tf32 tensor
    # cores for 16-bit outputs (10-bit mantissa, finer than the bf16 output), since an IEEE fp32 FMA dot
    # on a 128x128 tile needs more than 255 registers (spills; see the AOT test).
    return "ieee" if dtype == torch.float32 else "tf32"


# Rows (tokens) up to which the in-tile-dequant GEMM runs on a GPU. Above it, each W tile would be
# dequantised once per BLOCK_M rows (M/128 times over the layer): measured on an H100 (bench/RESULTS.md,
# bench_fused_lora_linear --gpu) that redundant per-element code-book work made the fused kernel 9-60x
# slower than dequantise-once + cuBLAS at 2k-16k tokens. Large M therefore dequantises the layer's weight
# once with the Triton NF4 kernel into a transient 16-bit buffer (freed right after the GEMM, recomputed
# in backward — never kept between forward and backward) and lets cuBLAS do the GEMM; the LoRA path and
# bias stay as in the fused kernel. Small M (decode, short batches) keeps the fully fused path, where
# reading 4-bit weights directly is the win. The interpreter (tests) always runs the fused kernels.
FUSED_IN_TILE_MAX_ROWS = 128


def _dense_weight(base: _Base, dtype: torch.dtype) -> torch.Tensor:
    """The base weight (N, K) in ``dtype``: Triton NF4 dequant for 4-bit bases, a view/cast otherwise."""
    if base.quantized:
        return nf4_dequantize(base.weight, base.quant_state, out_dtype=dtype, backend="triton")
    return base.weight.detach().to(dtype)


def _use_dequant_gemm(x2: torch.Tensor) -> bool:
    return x2.is_cuda and x2.shape[0] > FUSED_IN_TILE_MAX_ROWS and not triton_is_interpreted()


def _launch_forward(x2: torch.Tensor, base: _Base, xa: torch.Tensor | None, lora_B: torch.Tensor | None,
                    scaling: float) -> torch.Tensor:
    M, K = x2.shape
    N = base.out_features
    if _use_dequant_gemm(x2):
        w16 = _dense_weight(base, x2.dtype)
        y = x2 @ w16.t()  # cuBLAS, fp32 accumulation
        del w16  # transient: one layer's 16-bit weight, gone before the next layer runs
        if xa is not None:  # LoRA up-projection folded into the output (tensor cores, no M×N temporary)
            y.addmm_(xa.to(x2.dtype), lora_B.to(x2.dtype).t(), alpha=float(scaling))
        if base.bias is not None:
            y.add_(base.bias.to(x2.dtype))
        return y
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y
    cfg = gemm_config(M, N, K, x2.dtype, base.quantized)
    w, q = _weight_args(base)
    has_lora = xa is not None
    bias = base.bias
    R = xa.shape[1] if has_lora else 0
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    _fused_lora_fwd_kernel[grid](
        x2, w, q["absmax"], q["code"], q["absmax2"], q["code2"], q["offset"],
        bias if bias is not None else y, xa if has_lora else y, lora_B if has_lora else y, y,
        M, N, K, R, x2.stride(0), q["stride_wn"], xa.stride(0) if has_lora else 0,
        lora_B.stride(0) if has_lora else 0, y.stride(0), float(scaling),
        QUANT=base.quantized, W_ROUND=q["W_ROUND"], LOG2_BS=q["LOG2_BS"], LOG2_BS2=q["LOG2_BS2"],
        NESTED=q["NESTED"], HAS_BIAS=bias is not None, HAS_LORA=has_lora, DOT_PRECISION=_precision(x2.dtype),
        LORA_PRECISION=_precision(x2.dtype), BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=lora_block_r(R), GROUP_M=cfg.GROUP_M,
        INTERPRETER=triton_is_interpreted(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False,
    )
    return y


def _launch_backward_dx(dy: torch.Tensor, base: _Base, g: torch.Tensor, lora_A: torch.Tensor,
                        mask: torch.Tensor | None, lora_scale: float) -> torch.Tensor:
    M, N = dy.shape
    K = base.in_features
    if _use_dequant_gemm(dy):
        w16 = _dense_weight(base, dy.dtype)
        dx = dy @ w16
        del w16
        if mask is None:
            dx.addmm_(g.to(dy.dtype), lora_A.to(dy.dtype), alpha=float(lora_scale))
        else:
            dx.add_((g.to(dy.dtype) @ lora_A.to(dy.dtype)).mul_(mask.to(dy.dtype)), alpha=float(lora_scale))
        return dx
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if M == 0:
        return dx
    cfg = gemm_config(M, K, N, dy.dtype, base.quantized)
    w, q = _weight_args(base)
    mask_u8 = mask.view(torch.uint8) if mask is not None else None
    R = g.shape[1]
    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(K, cfg.BLOCK_K),)
    _fused_lora_bwd_dx_kernel[grid](
        dy, w, q["absmax"], q["code"], q["absmax2"], q["code2"], q["offset"], g, lora_A,
        mask_u8 if mask_u8 is not None else dx, dx,
        M, N, K, R, dy.stride(0), q["stride_wn"], g.stride(0), lora_A.stride(0),
        mask_u8.stride(0) if mask_u8 is not None else 0, dx.stride(0), float(lora_scale),
        QUANT=base.quantized, W_ROUND=q["W_ROUND"], LOG2_BS=q["LOG2_BS"], LOG2_BS2=q["LOG2_BS2"],
        NESTED=q["NESTED"], HAS_LORA=True, HAS_MASK=mask_u8 is not None, DOT_PRECISION=_precision(dy.dtype),
        LORA_PRECISION=_precision(dy.dtype), BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        BLOCK_R=lora_block_r(R), GROUP_M=cfg.GROUP_M, INTERPRETER=triton_is_interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return dx


def _weight_args(base: _Base) -> tuple[torch.Tensor, dict[str, Any]]:
    """(weight pointer tensor, scalar/tensor/constexpr kernel arguments) for the base weight."""
    if base.quantized:
        q = quant_kernel_args(base.weight, base.quant_state)
        q.update(stride_wn=0, W_ROUND=_W_ROUND[base.quant_state.dtype])
        return q["codes"], q
    w = base.weight.detach()
    if w.stride(1) != 1:
        w = w.contiguous()
    dummy = w  # never read when QUANT=False
    q = {"absmax": dummy, "code": dummy, "absmax2": dummy, "code2": dummy, "offset": 0.0, "LOG2_BS": 0,
         "LOG2_BS2": 0, "NESTED": False, "stride_wn": w.stride(0), "W_ROUND": 0}
    return w, q


_F32_CHUNK = 2048  # rows of the reduction dim upcast at a time (2048 x 14336 x 4 B = 117 MB at most)


def matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated AND returned in fp32 for 16-bit operands (no bf16 rounding of the result).

    The LoRA side matmuls (x·Aᵀ, dy·B, gᵀ·x, dyᵀ·xa) have an r-sized dimension, so doing them in fp32 costs
    ~r/N of the main GEMM; it keeps dA/dB free of the bf16 rounding of intermediates that plain autograd in
    bf16 suffers. The reduction dimension is upcast in chunks so no full fp32 copy of x or dy exists.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    half = a.dtype if a.dtype in (torch.bfloat16, torch.float16) else b.dtype
    if a.is_cuda and half in (torch.bfloat16, torch.float16):
        # Tensor cores with an fp32 result (aten::mm.dtype): the fp32 operand is always the small
        # rank-sized one (A, B, g, xa), so rounding it to 16 bits is what autocast training does anyway;
        # no upcast copies of x / dy and no slow fp32 GEMM. Older torch without out_dtype: chunked path.
        try:
            return torch.mm(a.to(half), b.to(half), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    k = a.shape[1]
    out = None
    for start in range(0, k, _F32_CHUNK):
        part = a[:, start:start + _F32_CHUNK].float() @ b[start:start + _F32_CHUNK].float()
        out = part if out is None else out.add_(part)
    if out is None:
        out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    return out


class FusedLoraLinearFunction(torch.autograd.Function):
    """Autograd Function of the Triton path (see the module docstring for what is saved and recomputed)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, bias: torch.Tensor | None,
                mask: torch.Tensor | None, base: _Base, scaling: float, dropout_p: float) -> torch.Tensor:  # type: ignore[override]
        # drop(x) = (x ⊙ mask) / (1-p): x ⊙ mask is exact in any dtype, the 1/(1-p) goes into fp32 scalars
        keep = 1.0 / (1.0 - dropout_p) if mask is not None else 1.0
        xm = x2 * mask.to(x2.dtype) if mask is not None else x2
        xa = matmul_f32(xm, lora_A.t()).mul_(keep)  # (M, r) fp32; x upcast in row chunks, never whole
        del xm  # recomputed in backward from x and the 1-byte mask
        y = _launch_forward(x2, base, xa, lora_B, scaling)
        ctx.save_for_backward(x2, lora_A, lora_B, xa, mask)
        ctx.base, ctx.scaling, ctx.dropout_p = base, float(scaling), float(dropout_p)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x2, lora_A, lora_B, xa, mask = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        dy = dy.contiguous()
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        dx = da = db = dbias = None
        g = None
        if need_x or need_a:
            g = matmul_f32(dy, lora_B)  # (M, r) fp32
        if need_x:
            dx = _launch_backward_dx(dy, ctx.base, g, lora_A, mask, s / (1.0 - p) if mask is not None else s)
        if need_a:
            xm = x2 * mask.to(x2.dtype) if mask is not None else x2
            keep = 1.0 / (1.0 - p) if mask is not None else 1.0
            da = (matmul_f32(g.t(), xm) * (s * keep)).to(lora_A.dtype)  # (r, K)
        if need_b:
            db = (matmul_f32(dy.t(), xa) * s).to(lora_B.dtype)  # (N, r)
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(ctx.base.bias.dtype)
        return dx, da, db, dbias, None, None, None, None


def fused_lora_linear(x: torch.Tensor, base_layer: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scaling: float, *, dropout_p: float = 0.0, training: bool = False,
                      dropout_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``base_layer(x) + scaling·lora_B(lora_A(dropout(x)))`` with the base weight dequantised in-tile.

    ``base_layer``: ``torch.nn.Linear`` (frozen 16/32-bit weight) or ``bitsandbytes.nn.Linear4bit`` (NF4/FP4,
    single or double quant, optional bias). ``lora_A`` (r, in), ``lora_B`` (out, r); ``x`` (..., in).
    ``dropout_p``/``training``: LoRA input dropout, exact (mask drawn with the torch RNG or given as
    ``dropout_mask``). Returns (..., out) in x's dtype. See the module docstring for dtypes and backends.
    """
    base = _describe_base(base_layer)
    _validate(x, base, lora_A, lora_B)
    if not use_triton(backend, x.device, "fused_lora_linear"):
        return reference_lora_linear(x, base_layer, lora_A, lora_B, scaling, dropout_p=dropout_p,
                                     training=training, dropout_mask=dropout_mask)
    mask = resolve_dropout_mask(x, dropout_p, training, dropout_mask)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, base.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    mask2 = mask.reshape(-1, base.in_features).contiguous() if mask is not None else None
    a = lora_A if lora_A.stride(-1) == 1 else lora_A.contiguous()
    b = lora_B if lora_B.stride(-1) == 1 else lora_B.contiguous()
    y = FusedLoraLinearFunction.apply(x2, a, b, base.bias, mask2, base, float(scaling), float(dropout_p))
    return y.reshape(*lead, base.out_features)
