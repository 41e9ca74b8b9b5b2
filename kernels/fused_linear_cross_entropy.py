"""Fused linear cross-entropy: the loss of ``hidden @ head_weight.T`` without materialising the logits.

Why: with a 128k vocabulary the logits of one 8k-token batch are 4 GB in fp32, more than the rest of
a QLoRA step. We process rows in chunks; each chunk's logits (``rows × V``, fp32) are computed, turned
into the per-row loss AND, in the same buffer, into d(loss)/d(logits); the chunk's contribution to
grad_hidden / grad_head_weight / grad_bias is taken with two GEMMs and the buffer is reused. So the
gradients exist at the end of the forward pass and backward only scales them by grad_output.

Shapes: hidden (..., H) flattened to N × H; head_weight V × H (as ``nn.Linear``); labels (...) → N.

Per row, with z = logits (after the optional soft-cap z = c·tanh(x/c)), lse = logsumexp(z), y the
target, ε the label smoothing and ζ the z-loss weight (torch's cross_entropy convention for ε)::

    loss = lse - (1-ε)·z_y - ε/V·Σ_j z_j + ζ·lse²
    dloss/dz_j = softmax(z)_j·(1 + 2ζ·lse) - ε/V - (1-ε)·[j = y]
    dz/dx = 1 - (z/c)²   (soft-cap chain rule)

Ignored rows (label == ignore_index) contribute 0 loss and 0 gradient.

Two backends share the chunk driver (:func:`run_chunks`): a Triton path (a tiled ``tl.dot`` GEMM that
writes fp32 logits + a per-row kernel doing an online softmax over vocab blocks and writing the
gradient in place) and a PyTorch path (exact fp32 math, used on CPU). ``reduction="none"`` cannot
pre-compute gradients (the upstream gradient is per row and unknown in forward), so its backward
re-runs the chunk loop with the upstream gradient as the per-row scale.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftlab.errors import PeftlabError

try:  # Triton is a Linux-only dependency; the PyTorch path works without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    _HAS_TRITON = False

_REDUCTIONS = ("sum", "mean", "none")
_BACKENDS = ("auto", "triton", "torch")

# Launch configuration of the logits GEMM. BLOCK_K >= 16 is required by tl.dot. ptxas (AOT test) on
# sm_80/89/90: 64×128×32 over 8 warps needs 212 registers (fp32, exact FMA path) / 149-166 (bf16 tensor
# cores) and does not spill; 4 warps or 128×128 hit the 255-register cap and spill.
GEMM_BLOCK_M = 64
GEMM_BLOCK_N = 128
GEMM_BLOCK_K = 32
GEMM_NUM_WARPS = 8
GEMM_NUM_STAGES = 3
# Row kernels stream the vocab in blocks of ROW_BLOCK_V: 4096 fp32 over 8 warps is 16 values per thread
# per live tensor; larger blocks spill once the soft-cap / z-loss temporaries are live.
ROW_BLOCK_V = 4096
ROW_NUM_WARPS = 8
# Vocab slice used by the exact PyTorch path when the head is not fp32: upcasting a 16k × H slice
# at a time keeps the fp32 copy of the head small (16384 × 4096 × 4 B = 256 MB).
_TORCH_VOCAB_SLICE = 16384


# --------------------------------------------------------------------------------------------------
# Options and validation
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CEOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None


def check_reduction(reduction: str, normalizer: float | torch.Tensor | None) -> None:
    if reduction not in _REDUCTIONS:
        raise PeftlabError(f"reduction={reduction!r} is not supported; use one of {_REDUCTIONS}.")
    if normalizer is not None and reduction != "sum":
        raise PeftlabError(
            f"normalizer is only valid with reduction='sum' (got reduction={reduction!r}); pass "
            "reduction='sum', normalizer=<number of target tokens> to normalise across micro-batches."
        )
    if normalizer is not None and torch.is_tensor(normalizer) and normalizer.numel() != 1:
        raise PeftlabError(f"normalizer must be a number or a 0-dim tensor, got shape {tuple(normalizer.shape)}.")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """"triton" or "torch" for ``backend`` in ("auto", "triton", "torch")."""
    if backend not in _BACKENDS:
        raise PeftlabError(f"backend={backend!r} is not supported; use one of {_BACKENDS}.")
    if backend == "auto":
        return "triton" if _HAS_TRITON and all(t.is_cuda for t in tensors) else "torch"
    if backend == "triton":
        if not _HAS_TRITON:
            raise PeftlabError("backend='triton' was requested but triton cannot be imported; use backend='torch'.")
        if any(t.dtype == torch.float64 for t in tensors):
            raise PeftlabError("the Triton backend does not support float64 inputs; use backend='torch'.")
    return backend


def flatten_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   bias: torch.Tensor | None, what: str = "hidden") -> tuple[torch.Tensor, torch.Tensor]:
    """(N × H hidden, N labels) after checking shapes and dtypes against the head."""
    if not hidden.is_floating_point():
        raise PeftlabError(f"{what} must be a floating-point tensor, got {hidden.dtype}.")
    check_head_weight(hidden, weight)
    if labels.dtype not in (torch.int64, torch.int32):
        raise PeftlabError(f"labels must be int64 token ids, got {labels.dtype}.")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise PeftlabError(
            f"labels shape {tuple(labels.shape)} must equal {what} shape without the last dim "
            f"{tuple(hidden.shape[:-1])} (labels already shifted: labels[i] is the target of {what}[i])."
        )
    check_head_bias(weight, bias)
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()


def check_head_weight(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise PeftlabError(
            f"head weight must be (vocab, hidden) = (V, {hidden.shape[-1]}) like nn.Linear.weight, got "
            f"{tuple(weight.shape)}; pass lm_head.weight, not its transpose."
        )


def check_head_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise PeftlabError(f"head bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")


def check_softcap(softcap: float | None) -> None:
    if softcap is not None and not softcap > 0.0:
        raise PeftlabError(f"softcap must be a positive number (Gemma-2 uses 30.0) or None, got {softcap}.")


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise PeftlabError(
            f"label {value} is outside the vocabulary [0, {vocab}); mask padding with ignore_index="
            f"{ignore_index} or check that the tokenizer matches the model head."
        )


# Fewest rows per chunk (when the memory cap allows): the chunk is the M dimension of three vocab-wide GEMMs
# (logits, grad_hidden, grad_head). Measured on an H100 (bench/RESULTS.md, H=4096, V=128256, bf16): 128-row
# chunks (the old rule at 2k tokens) made the fused loss 1.57x slower than unfused, 256-row chunks (8k) 0.93x
# and 1024-row chunks (32k) 0.75x: below a few hundred rows cuBLAS cannot fill the GPU and the per-chunk work
# that scales with V·H (a weight-gradient accumulation when the head trains, launches) does not amortise.
MIN_CHUNK_ROWS = 512
# Byte budget of one fp32 logits chunk (per head: the KD loss holds a student and a teacher chunk).
CHUNK_BYTES_FLOOR = 64 << 20
CHUNK_BYTES_CAP = 512 << 20


def default_chunk_rows(n_rows: int, hidden_size: int, vocab: int, n_heads: int = 1, *, gpu: bool = True) -> int:
    """Rows per chunk, from the token count, hidden size and vocabulary.

    1. The fp32 logits chunk is about the size of the (fp32) hidden states — Liger's V/H rule: the loss
       never holds more than one more copy of its input — kept within [64 MB, 512 MB] per head;
    2. on a GPU (``gpu``), at least :data:`MIN_CHUNK_ROWS` rows while that chunk fits the 512 MB cap (GEMM
       efficiency at small token counts: 1k-8k tokens get 512 rows instead of 128-256); a CPU GEMM is as fast
       on smaller chunks, so there the memory rule alone decides (512 rows cost a 155M model's step ~370 MB);
    3. balanced over the chunks this takes, so the last chunk is not a sliver (2,100 rows at 512: five
       chunks of 420, not four of 512 and one of 52).

    Memory: one chunk is ``rows·V·4`` bytes (256 MB at V=128,256 and 512 rows), still ≤ 0.1x the unfused
    logits of any batch of 1k tokens or more.
    """
    n_rows, vocab = max(int(n_rows), 1), max(int(vocab), 1)
    heads = max(int(n_heads), 1)
    row_bytes = vocab * 4
    target = min(max(n_rows * hidden_size * 4, CHUNK_BYTES_FLOOR), CHUNK_BYTES_CAP) // heads
    rows = max(target // row_bytes, 1)
    cap_rows = max(CHUNK_BYTES_CAP // heads // row_bytes, 1)
    if gpu:
        rows = max(rows, min(MIN_CHUNK_ROWS, cap_rows))
    if rows >= n_rows:
        return n_rows
    chunks = -(-n_rows // rows)
    return -(-n_rows // chunks)  # balanced: never more rows than the budget, no sliver at the end


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _logits_kernel(h_ptr, w_ptr, b_ptr, out_ptr, M, V, H, stride_hm, stride_wv, stride_om, has_bias,
                       DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[M, V] (fp32) = h[M, H] @ w[V, H]^T (+ b). Grid (cdiv(M, BLOCK_M), cdiv(V, BLOCK_N)):
        the M blocks of one vocab tile are adjacent programs, so each head tile is read from HBM once
        while the (small) hidden chunk stays in L2."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < V
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(H, BLOCK_K)):  # noqa: PIE808 (interpreter-friendly form)
            offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            a = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptr + offs_n[None, :] * stride_wv + offs_k[:, None],
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0)
            if DOT_FP32:  # fp32 (or mixed) inputs: exact fp32 products, no tf32 rounding
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:  # bf16/fp16 inputs on tensor cores, fp32 accumulation
                acc = tl.dot(a, b, acc)
        if has_bias:  # runtime flag: one compiled variant; the branch is uniform and outside the K loop
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _ce_row_kernel(logits_ptr, stride_row, labels_ptr, scale_ptr, loss_ptr, V, ignore_index,
                       label_smoothing, z_loss, softcap, compute_grad, HAS_SOFTCAP: tl.constexpr,
                       BLOCK_V: tl.constexpr):
        """One program per row of a fp32 logits chunk: loss[row] and the logits row
        overwritten in place by scale[row] · dloss/dlogits if compute_grad (a runtime flag: one compiled
        variant, a uniform branch per row). Two passes over vocab blocks: an online
        max/sum-exp (plus Σz for label smoothing), then the gradient."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row  # int64: row·V overflows int32 for large chunks
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
        m = tl.zeros((), dtype=tl.float32) - float("inf")
        d = tl.zeros((), dtype=tl.float32)
        zsum = tl.zeros((), dtype=tl.float32)
        for i in range(0, tl.cdiv(V, BLOCK_V)):  # noqa: PIE808 (interpreter-friendly form)
            offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                # tanh(u) = 1 - 2/(exp(2u)+1): saturates correctly to ±1 at both ends
                z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        y_safe = tl.where(valid, y, 0)
        zy = tl.load(base + y_safe).to(tl.float32)
        if HAS_SOFTCAP:
            zy = softcap * (1.0 - 2.0 / (tl.exp(2.0 * zy / softcap) + 1.0))
        loss = lse - (1.0 - label_smoothing) * zy - label_smoothing / V * zsum + z_loss * lse * lse
        loss = tl.where(valid, loss, 0.0)
        tl.store(loss_ptr + row, loss)
        if compute_grad:
            scale = tl.where(valid, tl.load(scale_ptr + row).to(tl.float32), 0.0)
            p_scale = 1.0 + 2.0 * z_loss * lse
            for i in range(0, tl.cdiv(V, BLOCK_V)):  # noqa: PIE808 (interpreter-friendly form)
                offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
                mask = offs < V
                x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = 1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0)
                    z = softcap * t
                else:
                    z = x
                g = tl.exp(z - lse) * p_scale - label_smoothing / V
                g = tl.where(offs == y, g - (1.0 - label_smoothing), g)
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(base + offs, g * scale, mask=mask)


_TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gemm_launch(h_dtype: torch.dtype, w_dtype: torch.dtype, has_bias: bool,
                interpreter: bool | None = None) -> tuple[dict, int, int]:
    """(constexprs, num_warps, num_stages) of ``_logits_kernel`` for these dtypes: the single source of
    the launch configuration, used by the dispatch and (with interpreter=False) the AOT compile test."""
    interpreter = _interpreting() if interpreter is None else interpreter
    # Triton 3.6's interpreter multiplies the raw uint16 bits of bf16 operands in tl.dot
    # (runtime/interpreter.py create_dot), so under TRITON_INTERPRET bf16 tiles are upcast first. The
    # result is the same: bf16 x bf16 products are exact in fp32 and both accumulate in fp32. The
    # tensor-core branch is exercised on GPU (bench --gpu parity check) and by the AOT compile test.
    dot_fp32 = torch.float32 in (h_dtype, w_dtype) or h_dtype != w_dtype or interpreter
    del has_bias  # a runtime argument of the kernel
    constexprs = {"DOT_FP32": dot_fp32, "BLOCK_M": GEMM_BLOCK_M,
                  "BLOCK_N": GEMM_BLOCK_N, "BLOCK_K": GEMM_BLOCK_K}
    return constexprs, GEMM_NUM_WARPS, GEMM_NUM_STAGES


def ce_row_launch(softcap: bool) -> tuple[dict, int, int]:
    """(constexprs, num_warps, num_stages) of ``_ce_row_kernel``."""
    return {"HAS_SOFTCAP": softcap, "BLOCK_V": ROW_BLOCK_V}, ROW_NUM_WARPS, 3


def aot_launches(dtype: torch.dtype) -> list[tuple]:
    """Every (kernel, signature, constexprs, num_warps, num_stages) the dispatch launches for inputs of
    ``dtype`` (the head in the same dtype), for the AOT compile test. Shapes enter only as runtime
    ints, so these are the launches for H=4096, V=128256 too."""
    t = _TL_DTYPES[dtype]
    gemm_sig = {"h_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "out_ptr": "*fp32", "M": "i32", "V": "i32",
                "H": "i32", "stride_hm": "i32", "stride_wv": "i32", "stride_om": "i32", "has_bias": "i32"}
    row_sig = {"logits_ptr": "*fp32", "stride_row": "i32", "labels_ptr": "*i64", "scale_ptr": "*fp32",
               "loss_ptr": "*fp32", "V": "i32", "ignore_index": "i32", "label_smoothing": "fp32",
               "z_loss": "fp32", "softcap": "fp32", "compute_grad": "i32"}
    cx, nw, ns = gemm_launch(dtype, dtype, False, interpreter=False)
    out = [(_logits_kernel, gemm_sig, cx, nw, ns)]
    for softcap in (False, True):
        cx, nw, ns = ce_row_launch(softcap)
        out.append((_ce_row_kernel, row_sig, cx, nw, ns))
    return out


def triton_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits (M × V) of one chunk with the Triton GEMM."""
    m, hs = h.shape
    v = weight.shape[0]
    h = h.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    if (h.is_cuda and not _interpreting() and h.dtype == weight.dtype
            and h.dtype in (torch.bfloat16, torch.float16)):
        # cuBLAS with an fp32 result (aten::mm.dtype) beats our tl.dot GEMM at every measured size on an
        # H100 (bench/RESULTS.md); same math: 16-bit operands, fp32 accumulation and output.
        try:
            res = torch.mm(h, weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            res = None
        if res is not None:
            if bias is not None:
                res += bias.float()
            if out is not None:
                out.copy_(res)
                return out
            return res
    if out is None:
        out = torch.empty((m, v), device=h.device, dtype=torch.float32)
    constexprs, num_warps, num_stages = gemm_launch(h.dtype, weight.dtype, bias is not None)
    grid = (triton.cdiv(m, GEMM_BLOCK_M), triton.cdiv(v, GEMM_BLOCK_N))
    _logits_kernel[grid](
        h, weight, bias if bias is not None else h, out, m, v, hs, h.stride(0), weight.stride(0),
        out.stride(0), int(bias is not None), **constexprs, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def torch_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Exact logits of one chunk in the compute dtype (fp32, or fp64 for fp64 inputs).

    A low-precision head is upcast one vocab slice at a time so no fp32 copy of the whole head exists."""
    cd = compute_dtype(h, weight)
    hc = h.to(cd)
    if weight.dtype == cd:
        out = hc @ weight.t()
    else:
        out = torch.empty((h.shape[0], weight.shape[0]), device=h.device, dtype=cd)
        for v0 in range(0, weight.shape[0], _TORCH_VOCAB_SLICE):
            torch.matmul(hc, weight[v0:v0 + _TORCH_VOCAB_SLICE].to(cd).t(), out=out[:, v0:v0 + _TORCH_VOCAB_SLICE])
    if bias is not None:
        out += bias.to(cd)
    return out


def chunk_grad_matmuls(dlogits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, exact: bool,
                       grad_h: torch.Tensor | None, grad_w: torch.Tensor | None,
                       grad_b: torch.Tensor | None) -> None:
    """grad_h (rows × H) = dlogits @ W; grad_w (V × H) += dlogitsᵀ @ h; grad_b += Σ_rows dlogits.

    ``exact`` (PyTorch path): everything in the fp32/fp64 compute dtype, the head upcast slice by slice.
    Otherwise (Triton/CUDA path): dlogits is rounded to the head dtype for the two tensor-core GEMMs
    (fp32 accumulation) exactly as autograd of a bf16 lm_head does; grad_w still accumulates across
    chunks in fp32."""
    cd = dlogits.dtype
    if grad_b is not None:
        grad_b += dlogits.sum(0).to(grad_b.dtype)
    if exact or weight.dtype == cd:
        if grad_h is not None:
            if weight.dtype == cd:
                torch.matmul(dlogits, weight, out=grad_h)
            else:
                grad_h.zero_()
                for v0 in range(0, weight.shape[0], _TORCH_VOCAB_SLICE):
                    sl = slice(v0, v0 + _TORCH_VOCAB_SLICE)
                    grad_h += dlogits[:, sl] @ weight[sl].to(cd)
        if grad_w is not None:
            grad_w.addmm_(dlogits.t(), h.to(cd))
    else:
        d_low = dlogits.to(weight.dtype)
        if grad_h is not None:
            grad_h.copy_(d_low @ weight)
        if grad_w is not None:
            grad_w += (d_low.t() @ h.to(weight.dtype)).to(grad_w.dtype)


# --------------------------------------------------------------------------------------------------
# Per-chunk loss + in-place gradient
# --------------------------------------------------------------------------------------------------
def softcap_(logits: torch.Tensor, softcap: float | None,
             keep_tanh: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z, t): the logits chunk soft-capped in place, z = c·tanh(x/c), and (``keep_tanh``, for the gradient)
    t = tanh(x/c), a chunk-sized copy made only with soft-capping; (logits, None) without a soft-cap."""
    if softcap is None:
        return logits, None
    z = logits.div_(softcap).tanh_()
    t = z.clone() if keep_tanh else None
    return z.mul_(softcap), t


def softcap_chain_(g: torch.Tensor, t: torch.Tensor | None) -> None:
    """g *= dz/dx = 1 - t² in place (the soft-cap's chain rule; t is consumed); nothing when t is None."""
    if t is not None:
        g.mul_(t.mul_(t).neg_().add_(1.0))


def torch_ce_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, opts: CEOptions,
                  compute_grad: bool) -> torch.Tensor:
    """PyTorch twin of ``_ce_row_kernel``: per-row loss; logits overwritten by scale·dloss/dlogits."""
    v = logits.shape[1]
    valid = labels != opts.ignore_index
    y = torch.where(valid, labels, 0).unsqueeze(1)
    z, t = softcap_(logits, opts.softcap, compute_grad)
    lse = torch.logsumexp(z, dim=1)
    loss = lse - (1.0 - opts.label_smoothing) * z.gather(1, y).squeeze(1) + opts.z_loss * lse * lse
    if opts.label_smoothing:
        loss = loss - opts.label_smoothing / v * z.sum(1)
    loss = torch.where(valid, loss, 0.0)
    if compute_grad:
        g = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
        g.mul_((1.0 + 2.0 * opts.z_loss * lse).unsqueeze(1))
        if opts.label_smoothing:
            g.sub_(opts.label_smoothing / v)
        g.scatter_add_(1, y, torch.full_like(y, -(1.0 - opts.label_smoothing), dtype=g.dtype))
        softcap_chain_(g, t)
        g.mul_(torch.where(valid, scale.to(g.dtype), 0.0).unsqueeze(1))
    return loss


def triton_ce_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, opts: CEOptions,
                   compute_grad: bool) -> torch.Tensor:
    rows, v = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    scale = scale.to(torch.float32).contiguous()
    constexprs, num_warps, num_stages = ce_row_launch(opts.softcap is not None)
    _ce_row_kernel[(rows,)](
        logits, logits.stride(0), labels.contiguous(), scale, loss, v, opts.ignore_index,
        float(opts.label_smoothing), float(opts.z_loss), float(opts.softcap or 1.0), int(compute_grad),
        **constexprs, num_warps=num_warps, num_stages=num_stages,
    )
    return loss


# A row function: (fp32 logits chunk, labels, per-row scale, compute_grad) -> per-row loss, with the
# chunk overwritten by scale·dloss/dlogits when compute_grad.
RowFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]

# An online function (the exact PyTorch path over a frozen low-precision head, see torch_ce_online):
# (hidden N × H, head, bias, labels N, per-row scale N, compute_grad) -> (per-row loss, grad_hidden | None).
OnlineFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, bool],
                    tuple[torch.Tensor, torch.Tensor | None]]

# Rows of one block of the online path: each block upcasts the whole head once, slice by slice, so the
# upcast work is (blocks × V × H) against the GEMMs' (N × V × H); 4096 rows make it < 1% of the step.
ONLINE_ROWS = 4096
ONLINE_MIN_SLICE = 1024  # vocabulary rows of one slice at least (a narrower GEMM loses CPU throughput)
ONLINE_SLICE_BYTES = 64 << 20  # the logits of one (row block × vocabulary slice), like the chunk floor


def online_block(n_rows: int, vocab: int, elem_bytes: int, chunk_rows: int | None = None) -> tuple[int, int]:
    """(rows of one block, vocabulary rows of one slice) of the online path for ``n_rows`` rows: blocks of
    ``chunk_rows`` (default :data:`ONLINE_ROWS`) balanced so the last is no sliver, slices whose logits are about
    :data:`ONLINE_SLICE_BYTES` (at least :data:`ONLINE_MIN_SLICE` wide). The memory planner counts the same."""
    rows = max(1, min(n_rows, chunk_rows or ONLINE_ROWS))
    rows = -(-n_rows // -(-n_rows // rows))
    return rows, online_slice(rows, vocab, elem_bytes)


def online_slice(rows: int, vocab: int, elem_bytes: int) -> int:
    return min(vocab, max(ONLINE_MIN_SLICE, ONLINE_SLICE_BYTES // (rows * elem_bytes)))


def online_applies(backend: str, hidden: torch.Tensor, weight: torch.Tensor, need_w: bool, need_b: bool) -> bool:
    """Whether the chunk driver takes the online path: the exact PyTorch backend over a head stored in a lower
    precision than the compute dtype (``model.frozen_16bit``: a bf16 head on an fp32 CPU run) that gets no
    gradient. Chunking rows there would upcast the whole head twice per row chunk (measured: a 155M model's
    step 13 s -> 20 s on 2 CPU cores); the online path upcasts it once per :data:`ONLINE_ROWS` rows."""
    cd = compute_dtype(hidden, weight)
    return backend == "torch" and weight.dtype != cd and not need_w and not need_b


class OnlineSoftmax:
    """Softmax statistics of rows whose logits arrive one vocabulary slice at a time, accumulated online as flash
    attention does: running maximum m and sum l, and (``with_rows``) the softmax-weighted sum of head rows
    ``rows = Σ_j exp(z_j - m)·W_j``, rescaled by exp(m_old - m_new) whenever the maximum grows. Shared by the
    vocabulary-outer CE (:func:`torch_ce_online`) and forward-KL KD (``torch_kd_online``) passes.

    ``out`` (rows × hdim, compute dtype) is zeroed and used as ``rows``: the CE accumulates straight into its
    grad_hidden block instead of a separate buffer."""

    def __init__(self, rows: int, hdim: int, ref: torch.Tensor, with_rows: bool, out: torch.Tensor | None = None):
        self.m = torch.full((rows,), float("-inf"), device=ref.device, dtype=ref.dtype)
        self.l = torch.zeros(rows, device=ref.device, dtype=ref.dtype)
        if not with_rows:
            self.rows = None
        elif out is not None:
            self.rows = out.zero_()
        else:
            self.rows = torch.zeros((rows, hdim), device=ref.device, dtype=ref.dtype)

    def add(self, z: torch.Tensor, w: torch.Tensor, factor: torch.Tensor | None = None,
            in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold the slice's logits z (rows × width, head rows w) in; returns exp(z - m) and the rescale factor.

        ``in_place``: the exponentials overwrite z (no slice-sized temporary; for callers done with z).
        ``factor`` (rows × width): each term of the head-row sum is multiplied by it (the soft-cap's chain-rule
        factor 1 - t²); the returned exponentials then carry it too."""
        m_new = torch.maximum(self.m, z.amax(1))
        rescale = torch.exp(self.m - m_new)
        e = z.sub_(m_new.unsqueeze(1)).exp_() if in_place else torch.exp(z - m_new.unsqueeze(1))
        self.l.mul_(rescale).add_(e.sum(1))
        if self.rows is not None:
            if factor is not None:
                e.mul_(factor)
            self.rows.mul_(rescale.unsqueeze(1)).addmm_(e, w)
        self.m = m_new
        return e, rescale

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.l)

    def expected_row(self) -> torch.Tensor:
        """Σ_j softmax(z)_j · W_j."""
        return self.rows / self.l.unsqueeze(1)


def gather_target(z: torch.Tensor, y: torch.Tensor, v0: int, z_y: torch.Tensor) -> torch.Tensor:
    """z_y updated with the rows whose target falls in the slice z starting at vocabulary row v0."""
    here = (y >= v0) & (y < v0 + z.shape[1])
    return torch.where(here, z.gather(1, (y - v0).clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1), z_y)


def slice_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, width: int,
                 cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(head rows v0:v0+width upcast to ``cd``, their logits ``h @ W_slice.T (+ b)``) for the online passes."""
    w = weight[v0:v0 + width].to(cd)
    z = h @ w.t()
    if bias is not None:
        z += bias[v0:v0 + width].to(cd)
    return w, z


def torch_ce_online(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    scale: torch.Tensor, opts: CEOptions, compute_grad: bool,
                    chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact cross-entropy (and scale·dloss/dhidden) of a frozen head kept in 16 bits, vocabulary outer.

    Rows go in blocks of ``chunk_rows`` (default :data:`ONLINE_ROWS`); within a block the head is read one
    vocabulary slice at a time (upcast to the compute dtype once, ``rows × slice`` logits of about
    :data:`ONLINE_SLICE_BYTES`) and the softmax is accumulated online, as flash attention does with its values: a running
    maximum m and sum l per row, and the softmax-weighted sum of head rows ``acc = Σ_j exp(z_j - m)·W_j``
    rescaled by exp(m_old - m_new) when the maximum grows. At the end, with lse = m + log l::

        dloss/dh = (1 + 2ζ·lse)·acc / l - ε/V·Σ_j W_j - (1-ε)·W_y

    (with a soft-cap every term of the sum carries its 1 - t_j² factor, which is why it then keeps a second
    accumulator for the ε term). Two GEMMs per slice, like the row-chunked path; one exp per logit instead of
    two; the logits of a slice are the only vocabulary-sized buffer.
    """
    n, hdim = hidden.shape
    v = weight.shape[0]
    cd = compute_dtype(hidden, weight)
    eps, zeta, cap = opts.label_smoothing, opts.z_loss, opts.softcap
    loss = torch.empty(n, device=hidden.device, dtype=cd)
    grad_h = torch.empty((n, hdim), device=hidden.device, dtype=cd) if compute_grad else None
    rows, _ = online_block(n, v, cd.itemsize, chunk_rows)
    w_sum = None  # Σ_j W_j (label smoothing without a soft-cap), made during the first block
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        h = hidden[sl].to(cd)
        r = h.shape[0]
        valid = labels[sl] != opts.ignore_index
        y = torch.where(valid, labels[sl], 0)
        width = online_slice(r, v, cd.itemsize)
        sm = OnlineSoftmax(r, hdim, h, grad_h is not None, out=grad_h[sl] if grad_h is not None else None)
        z_y = torch.zeros(r, device=h.device, dtype=cd)
        z_sum = torch.zeros(r, device=h.device, dtype=cd) if eps else None
        acc_eps = torch.zeros_like(h) if grad_h is not None and eps and cap is not None else None
        make_w_sum = grad_h is not None and eps and cap is None and w_sum is None
        if make_w_sum:
            w_sum = torch.zeros(hdim, device=h.device, dtype=cd)
        for v0 in range(0, v, width):
            w, z = slice_logits(h, weight, bias, v0, width, cd)
            d = None
            if cap is not None:
                z.div_(cap).tanh_()
                d = (1.0 - z * z) if grad_h is not None else None  # the soft-cap's chain-rule factor
                z.mul_(cap)
            z_y = gather_target(z, y, v0, z_y)
            if z_sum is not None:
                z_sum += z.sum(1)
            sm.add(z, w, factor=d, in_place=True)  # z is spent: its exponentials overwrite it
            if acc_eps is not None:
                acc_eps.addmm_(d, w)
            if make_w_sum:
                w_sum += w.sum(0)
            del w, z, d
        lse = sm.lse()
        l_sum, acc = sm.l, sm.rows
        row_loss = lse - (1.0 - eps) * z_y + zeta * lse * lse
        if z_sum is not None:
            row_loss = row_loss - eps / v * z_sum
        loss[sl] = torch.where(valid, row_loss, 0.0)
        if acc is not None:
            s = torch.where(valid, scale[sl].to(cd), 0.0)
            acc.mul_(((1.0 + 2.0 * zeta * lse) / l_sum * s).unsqueeze(1))
            w_y = weight.index_select(0, y).to(cd)
            if cap is not None:
                t_y = z_y / cap
                w_y.mul_((1.0 - t_y * t_y).unsqueeze(1))
            acc.sub_(w_y.mul_(((1.0 - eps) * s).unsqueeze(1)))
            if eps:
                acc.sub_((eps / v * s).unsqueeze(1) * (acc_eps if acc_eps is not None else w_sum.unsqueeze(0)))
    return loss, grad_h


def run_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               row_scale: torch.Tensor, row_fn: RowFn, backend: str, chunk_rows: int, compute_grad: bool,
               need_h: bool, need_w: bool, need_b: bool,
               extra_logits: Callable[[slice], tuple[torch.Tensor, ...]] | None = None,
               online: OnlineFn | None = None):
    """Drive the chunk loop shared by the CE and KD losses.

    hidden N × H, weight V × H, labels N, row_scale N (upstream gradient × reduction weight per row).
    Returns (loss N, grad_hidden N × H | None, grad_weight V × H fp32 | None, grad_bias V fp32 | None);
    grads are in the compute dtype and already include row_scale. ``extra_logits(slice)`` supplies extra
    per-chunk tensors (teacher logits for KD) passed to ``row_fn`` after the labels. ``online`` (the CE
    family's :func:`torch_ce_online`) replaces the row chunks where :func:`online_applies`.
    """
    if online is not None and online_applies(backend, hidden, weight, compute_grad and need_w,
                                             compute_grad and need_b):
        loss, grad_h = online(hidden, weight, bias, labels, row_scale, compute_grad and need_h)
        return loss, grad_h, None, None
    n = hidden.shape[0]
    cd = compute_dtype(hidden, weight)
    loss = torch.empty(n, device=hidden.device, dtype=cd)
    grad_h = torch.empty((n, hidden.shape[1]), device=hidden.device, dtype=cd) if compute_grad and need_h else None
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=cd) if compute_grad and need_w else None
    grad_b = torch.zeros(weight.shape[0], device=weight.device, dtype=cd) if compute_grad and need_b else None
    logits_fn = triton_logits if backend == "triton" else torch_logits
    for start in range(0, n, chunk_rows):
        sl = slice(start, min(start + chunk_rows, n))
        h = hidden[sl]
        logits = logits_fn(h, weight, bias)  # rows × V, fp32: the only vocab-sized buffer alive
        extra = extra_logits(sl) if extra_logits is not None else ()
        loss[sl] = row_fn(logits, labels[sl], *extra, row_scale[sl], compute_grad)
        if compute_grad:
            chunk_grad_matmuls(logits, h, weight, backend == "torch",
                               grad_h[sl] if grad_h is not None else None, grad_w, grad_b)
        del logits, extra
    return loss, grad_h, grad_w, grad_b


def reduction_scale(valid: torch.Tensor, reduction: str, normalizer: float | torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """Per-row weight of each token's loss in the returned value: 1 (sum), 1/normalizer, 1/n_valid
    (mean; 0 targets → weight 1 and the loss is 0, never NaN), and 0 at ignored rows."""
    w = valid.to(dtype)
    if reduction == "mean":
        w = w / valid.sum().clamp(min=1).to(dtype)
    elif normalizer is not None:
        norm = normalizer.detach().to(device=w.device, dtype=dtype) if torch.is_tensor(normalizer) else normalizer
        w = w / norm
    return w


class ChunkedLossFunction(torch.autograd.Function):
    """Autograd wrapper around :func:`run_chunks` for any row function (CE, KD).

    sum/mean: gradients computed in forward (scaled by the reduction weight), backward multiplies by
    the scalar grad_output. none: forward computes losses only, backward re-runs the chunks with the
    upstream gradient as per-row scale (correct for ANY upstream gradient, at the cost of a second
    pass; the trainer never uses it, it is for custom per-token weighting)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, row_weight, row_fn, backend, chunk_rows, reduction,
                extra_logits, online=None):
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        ctx.need = need
        ctx.reduction = reduction
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if reduction == "none":
            loss, *_ = run_chunks(hidden, weight, bias, labels, row_weight, row_fn, backend, chunk_rows,
                                  False, False, False, False, extra_logits, online)
            ctx.save_for_backward(hidden, weight, bias, labels, row_weight)
            ctx.replay = (row_fn, backend, chunk_rows, extra_logits, online)
            return loss
        loss, gh, gw, gb = run_chunks(hidden, weight, bias, labels, row_weight, row_fn, backend, chunk_rows,
                                      any(need), *need, extra_logits, online)
        ctx.save_for_backward(gh, gw, gb)
        return (loss * row_weight).sum()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden, weight, bias, labels, row_weight = ctx.saved_tensors
            row_fn, backend, chunk_rows, extra_logits, online = ctx.replay
            scale = grad_out.to(row_weight.dtype) * row_weight
            _, gh, gw, gb = run_chunks(hidden, weight, bias, labels, scale, row_fn, backend, chunk_rows, True,
                                       *ctx.need, extra_logits, online)
        else:
            gh, gw, gb = ctx.saved_tensors
            gh = gh * grad_out.to(gh.dtype) if gh is not None else None
            gw = gw * grad_out.to(gw.dtype) if gw is not None else None
            gb = gb * grad_out.to(gb.dtype) if gb is not None else None
        hd, wd, bd = ctx.dtypes
        return (gh.to(hd) if gh is not None else None, gw.to(wd) if gw is not None else None,
                gb.to(bd) if gb is not None else None, None, None, None, None, None, None, None, None)


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                 row_weight: torch.Tensor, row_fn: RowFn, backend: str, chunk_rows: int, reduction: str,
                 extra_logits: Callable[[slice], tuple[torch.Tensor, ...]] | None,
                 online: OnlineFn | None = None) -> torch.Tensor:
    """:class:`ChunkedLossFunction` when autograd will need gradients; under ``torch.no_grad()`` (eval)
    only the losses, so a trainable head costs no V × H gradient buffer and no gradient GEMMs."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return ChunkedLossFunction.apply(hidden, weight, bias, labels, row_weight, row_fn, backend, chunk_rows,
                                         reduction, extra_logits, online)
    loss, *_ = run_chunks(hidden, weight, bias, labels, row_weight, row_fn, backend, chunk_rows, False, False,
                          False, False, extra_logits, online)
    return loss if reduction == "none" else (loss * row_weight).sum()


def finish_reduction(loss: torch.Tensor, reduction: str, labels_shape: torch.Size) -> torch.Tensor:
    return loss.reshape(labels_shape) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _check_ce_options(label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise PeftlabError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    if z_loss < 0.0:
        raise PeftlabError(f"z_loss must be >= 0 (typical 1e-4), got {z_loss}.")
    check_softcap(softcap)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    head_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "sum",
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ head_weight.T (+ head_bias)`` against ``labels``, chunked over rows.

    hidden (..., H) any float dtype; head_weight (V, H); labels (...) int64, already shifted.
    reduction: "sum" (divided by ``normalizer`` when given: pass the number of target tokens of all
    accumulated micro-batches), "mean" (over non-ignored tokens; 0 when there are none), or "none"
    (per token, shape of labels, 0 at ignored). z_loss adds z_loss·logsumexp² per token; softcap
    applies softcap·tanh(logits/softcap) before the softmax. The loss is fp32 (fp64 for fp64 inputs).
    backend: "auto" (Triton on CUDA, else PyTorch), "triton", "torch". chunk_size: rows per chunk
    (default from V/H and a memory budget, see :func:`default_chunk_rows`).
    Gradients are produced only for tensors that require grad (a frozen head costs no grad GEMM).
    """
    check_reduction(reduction, normalizer)
    _check_ce_options(label_smoothing, z_loss, softcap)
    h2, y = flatten_inputs(hidden, head_weight, labels, head_bias)
    be = resolve_backend(backend, h2, head_weight)
    v = head_weight.shape[0]
    check_labels(y, v, ignore_index)
    rows = chunk_size or default_chunk_rows(h2.shape[0], h2.shape[1], v, gpu=h2.is_cuda)
    if rows < 1:
        raise PeftlabError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
    opts = CEOptions(ignore_index, float(label_smoothing), float(z_loss),
                     None if softcap is None else float(softcap))
    row_impl = triton_ce_rows if be == "triton" else torch_ce_rows

    def row_fn(logits, lab, scale, compute_grad):
        return row_impl(logits, lab, scale, opts, compute_grad)

    def online(h, weight, bias, lab, scale, compute_grad):
        return torch_ce_online(h, weight, bias, lab, scale, opts, compute_grad, chunk_size)

    cd = compute_dtype(h2, head_weight)
    row_weight = reduction_scale(y != ignore_index, reduction, normalizer, cd)
    loss = chunked_loss(h2, head_weight, head_bias, y, row_weight, row_fn, be, rows, reduction, None, online)
    return finish_reduction(loss, reduction, labels.shape)


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    head_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "sum",
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch reference with the same signature: materialises the full fp32 logits and uses
    ``torch.nn.functional.cross_entropy`` + autograd. ``backend``/``chunk_size`` are ignored."""
    del backend, chunk_size
    check_reduction(reduction, normalizer)
    _check_ce_options(label_smoothing, z_loss, softcap)
    logits = reference_logits(hidden, head_weight, head_bias, compute_dtype(hidden, head_weight), softcap)
    logits = logits.reshape(-1, head_weight.shape[0])
    y = labels.reshape(-1)
    valid = y != ignore_index
    per_token = torch.nn.functional.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none",
                                                  label_smoothing=label_smoothing)
    if z_loss:
        per_token = per_token + z_loss * torch.where(valid, torch.logsumexp(logits, -1) ** 2, 0.0)
    return reference_reduction(per_token, valid, reduction, normalizer, labels.shape)


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cd: torch.dtype,
                     softcap: float | None = None) -> torch.Tensor:
    """The references' full logits ``hidden @ weight.T (+ bias)`` in ``cd`` (soft-capped when ``softcap``)."""
    logits = hidden.to(cd) @ weight.to(cd).t()
    if bias is not None:
        logits = logits + bias.to(cd)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def reference_reduction(per_token: torch.Tensor, valid: torch.Tensor, reduction: str,
                        normalizer: float | torch.Tensor | None, labels_shape: torch.Size) -> torch.Tensor:
    """The references' reduction of flat per-token losses: the fused losses' contract, written plainly."""
    if reduction == "none":
        return per_token.reshape(labels_shape)
    total = per_token.sum()
    if reduction == "mean":
        return total / valid.sum().clamp(min=1)
    return total / normalizer if normalizer is not None else total

