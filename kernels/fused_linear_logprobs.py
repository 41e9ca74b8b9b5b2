"""Fused per-sequence log-probs: Σₜ log softmax(hidden @ Wᵀ + b)[labels] per sequence, without B×T×V logits.

Why: preference losses (DPO, ORPO, SimPO, KTO) need one number per completion, the sum of its label log-probs,
for chosen and rejected completions in one forward. The usual way (full logits → log_softmax → gather) holds
B×T×V fp32 logits plus their log-softmax and gradient: at a 128k vocabulary, 2 pairs × 2 × 512 tokens are
1 GB each. Here, as in :mod:`peftlab.kernels.fused_linear_cross_entropy` (whose chunk driver and GEMMs we
reuse), rows go through the head in chunks and the only vocab-sized buffer is one chunk of fp32 logits.

Shapes: hidden (B, T, H); weight (V, H) like ``nn.Linear``; bias (V,); labels (B, T) already aligned
(labels[b, t] is the token predicted from hidden[b, t]); rows with ``ignore_index`` are skipped. Returns
``logps`` (B,) in fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden / weight / bias, and ``n_tokens``
(B,) int64, the number of scored tokens per sequence (IPO, SimPO and ORPO divide by it).

Per scored row, with z the logits (after the optional soft-cap z = c·tanh(x/c)) and y the label::

    logp = z_y − logsumexp(z)        d logp / d z_j = [j = y] − softmax(z)_j        dz/dx = 1 − (z/c)²

Design:

- **Only scored rows reach the head.** Prompt and padding rows (``ignore_index``) are dropped before the GEMM
  (an index_select of hidden), so a DPO batch whose prompts are half its tokens costs half the head FLOPs; the
  gradient is scattered back, zero at skipped rows.
- **Row kernel** ``_logprob_row_kernel`` (Triton; ``torch_logprob_rows`` is its PyTorch twin): one program per
  row of a fp32 logits chunk streams the vocab in blocks with an online max / sum-exp, writes the row's label
  log-prob and, in the same buffer, ``scale[row] · d logp / d logits``; the chunk driver then takes that
  buffer into grad_hidden / grad_weight / grad_bias with two GEMMs and reuses it.
- **Per-sequence upstream gradient.** The loss's gradient w.r.t. each sequence's log-prob is unknown in
  forward. With a frozen head (the (Q)LoRA case) only grad_hidden is needed and it is linear in that
  gradient row by row, so forward computes it with scale 1 (one pass, like the CE loss) and backward multiplies
  each row by its sequence's gradient. When the head or its bias trains, backward re-runs the chunks with the
  per-sequence gradients as row scales (a second head pass; grad_weight mixes all sequences).
"""
from __future__ import annotations

import torch
from peftlab.kernels.fused_linear_cross_entropy import (
    ROW_BLOCK_V,
    ROW_NUM_WARPS,
    CEOptions,
    check_head_bias,
    check_head_weight,
    check_labels,
    check_softcap,
    compute_dtype,
    default_chunk_rows,
    reference_logits,
    resolve_backend,
    run_chunks,
    softcap_,
    softcap_chain_,
    torch_ce_online,
)

from peftlab.errors import PeftlabError

try:  # Triton is a Linux-only dependency; the PyTorch path works without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    _HAS_TRITON = False


# --------------------------------------------------------------------------------------------------
# Triton row kernel
# --------------------------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _logprob_row_kernel(logits_ptr, stride_row, labels_ptr, scale_ptr, logp_ptr, V, softcap, compute_grad,
                            HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        """One program per (scored) row of a fp32 logits chunk: logp[row] = z_y − logsumexp(z) and, if
        compute_grad (a runtime flag: one compiled variant, a uniform branch), the row overwritten in place by
        scale[row] · ([j = y] − softmax(z)_j) (· (1 − t²) under the soft-cap). Rows are compacted by the
        caller, so every label is a real token in [0, V)."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row  # int64: row·V overflows int32 for large chunks
        y = tl.load(labels_ptr + row)
        m = tl.zeros((), dtype=tl.float32) - float("inf")
        d = tl.zeros((), dtype=tl.float32)
        for i in range(0, tl.cdiv(V, BLOCK_V)):  # noqa: PIE808 (interpreter-friendly form)
            offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                # tanh(u) = 1 - 2/(exp(2u)+1): saturates correctly to ±1 at both ends
                z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        zy = tl.load(base + y).to(tl.float32)
        if HAS_SOFTCAP:
            zy = softcap * (1.0 - 2.0 / (tl.exp(2.0 * zy / softcap) + 1.0))
        tl.store(logp_ptr + row, zy - lse)
        if compute_grad:
            scale = tl.load(scale_ptr + row).to(tl.float32)
            for i in range(0, tl.cdiv(V, BLOCK_V)):  # noqa: PIE808 (interpreter-friendly form)
                offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
                mask = offs < V
                x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = 1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0)
                    z = softcap * t
                else:
                    z = x
                g = -tl.exp(z - lse)
                g = tl.where(offs == y, g + 1.0, g)
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(base + offs, g * scale, mask=mask)


def logprob_row_launch(softcap: bool) -> tuple[dict, int, int]:
    """(constexprs, num_warps, num_stages) of ``_logprob_row_kernel``: the CE row kernel's block (4096 fp32
    over 8 warps, which ptxas fits without spills) — this kernel has fewer live temporaries."""
    return {"HAS_SOFTCAP": softcap, "BLOCK_V": ROW_BLOCK_V}, ROW_NUM_WARPS, 3


def aot_launches(dtype: torch.dtype) -> list[tuple]:
    """Every (kernel, signature, constexprs, num_warps, num_stages) the Triton dispatch launches for inputs of
    ``dtype`` (head in the same dtype): the shared logits GEMM and this op's row kernel with and without the
    soft-cap. Shapes are runtime ints, so these are the launches of H=4096, V=128256 too."""
    from peftlab.kernels.fused_linear_cross_entropy import aot_launches as ce_launches

    launches = [launch for launch in ce_launches(dtype) if launch[0].__name__ == "_logits_kernel"]
    row_sig = {"logits_ptr": "*fp32", "stride_row": "i32", "labels_ptr": "*i64", "scale_ptr": "*fp32",
               "logp_ptr": "*fp32", "V": "i32", "softcap": "fp32", "compute_grad": "i32"}
    for softcap in (False, True):
        launches.append((_logprob_row_kernel, row_sig, *logprob_row_launch(softcap)))
    return launches


# --------------------------------------------------------------------------------------------------
# Row functions (fp32 logits chunk -> per-row log-prob, chunk overwritten by scale · d logp / d logits)
# --------------------------------------------------------------------------------------------------
def torch_logprob_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, softcap: float | None,
                       compute_grad: bool) -> torch.Tensor:
    """PyTorch twin of ``_logprob_row_kernel`` (exact math in the chunk's fp32/fp64 dtype).

    Everything happens in the chunk's buffer: ``torch.logsumexp`` would allocate a second chunk-sized
    temporary (measured: it doubles this path's extra peak memory), so the max, exp and sum are taken in place
    and the softmax is ``exp(z − m) / Σ``."""
    y = labels.unsqueeze(1)
    z, t = softcap_(logits, softcap, compute_grad)
    zy = z.gather(1, y).squeeze(1)
    m = z.amax(dim=1, keepdim=True)
    e = z.sub_(m).exp_()  # exp(z − m), in place
    total = e.sum(dim=1, keepdim=True)
    logp = zy - (m + total.log()).squeeze(1)
    if compute_grad:
        g = e.div_(total).neg_()  # −softmax, in place
        g.scatter_add_(1, y, torch.ones_like(y, dtype=g.dtype))
        softcap_chain_(g, t)
        g.mul_(scale.to(g.dtype).unsqueeze(1))
    return logp


def triton_logprob_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, softcap: float | None,
                        compute_grad: bool) -> torch.Tensor:
    rows, v = logits.shape
    logp = torch.empty(rows, device=logits.device, dtype=torch.float32)
    constexprs, num_warps, num_stages = logprob_row_launch(softcap is not None)
    _logprob_row_kernel[(rows,)](
        logits, logits.stride(0), labels.contiguous(), scale.to(torch.float32).contiguous(), logp, v,
        float(softcap or 1.0), int(compute_grad), **constexprs, num_warps=num_warps, num_stages=num_stages,
    )
    return logp


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------
class _Rows:
    """The scored rows of a (B·T)-row batch: their flat indices, labels and sequence of each."""

    def __init__(self, labels2: torch.Tensor, seq_len: int, ignore_index: int):
        self.seq_len = seq_len
        self.index = torch.nonzero(labels2 != ignore_index).squeeze(1)  # ascending: one host sync per call
        self.labels = labels2.index_select(0, self.index)
        self.seq = torch.div(self.index, seq_len, rounding_mode="floor")


class _SequenceLogprobsFunction(torch.autograd.Function):
    """(B·T × H hidden, head) -> (B,) summed label log-probs; gradients as described in the module docstring."""

    @staticmethod
    def forward(ctx, hidden2, weight, bias, rows, n_seq, row_fn, backend, chunk_rows, online=None):
        need = (hidden2.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        cd = compute_dtype(hidden2, weight)
        h = hidden2.index_select(0, rows.index)
        # Frozen head: grad_hidden at unit scale now; backward scales each row by its sequence's gradient.
        eager = need[0] and not need[1] and not need[2]
        ones = torch.ones(h.shape[0], device=h.device, dtype=cd)
        row_logp, gh, _, _ = run_chunks(h, weight, bias, rows.labels, ones, row_fn, backend, chunk_rows,
                                        eager, eager, False, False, None, online)
        ctx.need, ctx.eager, ctx.replay = need, eager, (rows, row_fn, backend, chunk_rows, online)
        ctx.dtypes = (hidden2.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.n_rows = hidden2.shape[0]
        if eager:
            ctx.save_for_backward(gh)
        else:
            ctx.save_for_backward(hidden2, weight, bias)
        return _per_sequence(row_logp, rows, n_seq)

    @staticmethod
    def backward(ctx, grad_logps):
        rows, row_fn, backend, chunk_rows, online = ctx.replay
        hd, wd, bd = ctx.dtypes
        gw = gb = None
        if ctx.eager:
            (gh,) = ctx.saved_tensors
            gh = gh * grad_logps.to(gh.dtype).index_select(0, rows.seq).unsqueeze(1)
        else:
            hidden2, weight, bias = ctx.saved_tensors
            scale = grad_logps.to(compute_dtype(hidden2, weight)).index_select(0, rows.seq)
            _, gh, gw, gb = run_chunks(hidden2.index_select(0, rows.index), weight, bias, rows.labels, scale,
                                       row_fn, backend, chunk_rows, True, *ctx.need, None, online)
        grad_hidden = None
        if gh is not None:
            grad_hidden = torch.zeros((ctx.n_rows, gh.shape[1]), device=gh.device, dtype=hd)
            grad_hidden.index_copy_(0, rows.index, gh.to(hd))
        return (grad_hidden, gw.to(wd) if gw is not None else None, gb.to(bd) if gb is not None else None,
                None, None, None, None, None, None)


def _per_sequence(row_logp: torch.Tensor, rows: _Rows, n_seq: int) -> torch.Tensor:
    """Σ of the row log-probs of each sequence, deterministically (a dense B × T scatter, then a row sum;
    index_add_ would use atomics on CUDA)."""
    total_rows = n_seq * rows.seq_len
    dense = torch.zeros(total_rows, device=row_logp.device, dtype=row_logp.dtype)
    dense.index_copy_(0, rows.index, row_logp)
    return dense.view(n_seq, rows.seq_len).sum(1)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None, chunk_rows: int | None) -> None:
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise PeftlabError(f"hidden must be a floating-point (batch, seq, hidden) tensor, got {hidden.dtype} "
                           f"{tuple(hidden.shape)}.")
    check_head_weight(hidden, weight)
    if labels.dtype not in (torch.int64, torch.int32) or tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise PeftlabError(
            f"labels must be int64 token ids of shape (batch, seq) = {tuple(hidden.shape[:2])}, aligned with hidden "
            f"(labels[b, t] is predicted from hidden[b, t]); got {labels.dtype} {tuple(labels.shape)}."
        )
    check_head_bias(weight, bias)
    check_softcap(softcap)
    if chunk_rows is not None and chunk_rows < 1:
        raise PeftlabError(f"chunk_rows must be a positive number of rows, got {chunk_rows}.")


def fused_linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of label log-probs of ``hidden @ weight.T (+ bias)``, chunked over the scored rows.

    hidden (B, T, H) any float dtype; weight (V, H); labels (B, T) aligned with hidden, ``ignore_index`` where
    nothing is scored. Returns (logps (B,) fp32 — fp64 for fp64 inputs — with autograd to hidden / weight /
    bias, n_tokens (B,) int64). A sequence with no scored token has logp 0. softcap applies
    softcap·tanh(logits/softcap) before the softmax (Gemma-2). backend: "auto" (Triton on CUDA, else
    PyTorch), "triton", "torch". chunk_rows: scored rows per chunk (default: a chunk of fp32 logits about the
    size of the hidden states, 64–512 MB). Under ``torch.no_grad()`` (reference log-probs) no gradient is
    computed and nothing is kept.
    """
    _check_inputs(hidden, weight, labels, bias, softcap, chunk_rows)
    b, t, hs = hidden.shape
    hidden2 = hidden.reshape(b * t, hs)
    labels2 = labels.reshape(-1).long()
    be = resolve_backend(backend, hidden2, weight)
    v = weight.shape[0]
    check_labels(labels2, v, ignore_index)
    rows = _Rows(labels2, t, ignore_index)
    n_tokens = (labels != ignore_index).sum(1).to(torch.int64)
    cd = compute_dtype(hidden2, weight)
    if rows.index.numel() == 0:  # nothing scored: zeros that still depend on the inputs (backward works)
        return (hidden2.sum() * 0).to(cd).expand(b).clone(), n_tokens
    n_chunk = chunk_rows or default_chunk_rows(rows.index.numel(), hs, v, gpu=hidden2.is_cuda)
    softcap = None if softcap is None else float(softcap)
    row_impl = triton_logprob_rows if be == "triton" else torch_logprob_rows

    def row_fn(logits, lab, scale, compute_grad):
        return row_impl(logits, lab, scale, softcap, compute_grad)

    def online(h, w, bias_, lab, scale, compute_grad):  # a frozen 16-bit head on the CPU: log p = -CE
        nll, gh = torch_ce_online(h, w, bias_, lab, scale, CEOptions(softcap=softcap), compute_grad, chunk_rows)
        return nll.neg_(), gh.neg_() if gh is not None else None

    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden2, weight, bias)):
        logps = _SequenceLogprobsFunction.apply(hidden2, weight, bias, rows, b, row_fn, be, n_chunk, online)
    else:
        ones = torch.ones(rows.index.numel(), device=hidden.device, dtype=cd)
        row_logp, *_ = run_chunks(hidden2.index_select(0, rows.index), weight, bias, rows.labels, ones, row_fn,
                                  be, n_chunk, False, False, False, False, None, online)
        logps = _per_sequence(row_logp, rows, b)
    return logps, n_tokens


def reference_linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch reference with the same signature: full fp32 logits (B, T, V) → log_softmax → gather →
    masked sum, differentiated by autograd. ``chunk_rows``/``backend`` are ignored."""
    del chunk_rows, backend
    _check_inputs(hidden, weight, labels, bias, softcap, None)
    logits = reference_logits(hidden, weight, bias, compute_dtype(hidden, weight), softcap)
    valid = labels != ignore_index
    per_token = torch.log_softmax(logits, dim=-1).gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1))
    logps = torch.where(valid, per_token.squeeze(-1), 0.0).sum(1)
    return logps, valid.sum(1).to(torch.int64)
