"""Fused linear knowledge-distillation loss: student and teacher heads, logits never whole in memory.

Per non-ignored token, with s = student logits, t = teacher logits (no grad), T the temperature,
p_s = softmax(s/T), p_t = softmax(t/T), y the hard label::

    L = α · CE(softmax(s), y) + (1 - α) · T² · D(p_t, p_s)

    forward_kl:  D = KL(p_t ‖ p_s) = Σ p_t (log p_t - log p_s)
    reverse_kl:  D = KL(p_s ‖ p_t) = Σ p_s (log p_s - log p_t)
    jsd:         D = β · KL(p_t ‖ m) + (1 - β) · KL(p_s ‖ m),   m = β · p_t + (1 - β) · p_s

The JSD convention is TRL's ``generalized_jsd_loss`` (β weights the teacher): β = 0 is exactly
forward_kl and β = 1 exactly reverse_kl (special-cased like TRL, so log(0) never appears); β = 0.5 is
the symmetric JSD. The CE term uses the student logits at temperature 1. Ignored tokens contribute 0.

Rows are chunked exactly like :mod:`fused_linear_cross_entropy` (same chunk driver and reductions):
per chunk the student logits (with grad, fp32) and the teacher logits (no grad, fp32) are computed,
the loss and d(loss)/d(student logits) are produced in place in the student buffer, then folded into
grad_student_hidden / grad_student_head. The teacher may have a different hidden size (same vocab).

Gradients (used by the Triton row kernel; the PyTorch path takes them from autograd per chunk)::

    dCE/ds       = softmax(s) - onehot(y)
    dKL(t‖s)/ds  = (p_s - p_t) / T
    dKL(s‖t)/ds  = p_s (log p_s - log p_t - KL(p_s‖p_t)) / T
    dJSD/ds      = (1 - β) p_s (log p_s - log m - KL(p_s‖m)) / T
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from peftlab.kernels.fused_linear_cross_entropy import (
    _HAS_TRITON,
    ROW_BLOCK_V,
    ROW_NUM_WARPS,
    CEOptions,
    OnlineSoftmax,
    check_labels,
    check_reduction,
    chunked_loss,
    compute_dtype,
    default_chunk_rows,
    finish_reduction,
    flatten_inputs,
    gather_target,
    online_block,
    online_slice,
    reduction_scale,
    reference_logits,
    reference_reduction,
    resolve_backend,
    slice_logits,
    torch_ce_online,
    torch_logits,
    triton_logits,
)

from peftlab.errors import PeftlabError

if _HAS_TRITON:
    import triton
    import triton.language as tl

_KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


def _check_kd_options(kind: str, beta: float, temperature: float, alpha: float) -> None:
    if kind not in _KINDS:
        raise PeftlabError(f"kind={kind!r} is not supported; use one of {tuple(_KINDS)}.")
    if not 0.0 <= beta <= 1.0:
        raise PeftlabError(f"beta must be in [0, 1] (weight of the teacher in the JSD mixture), got {beta}.")
    if not temperature > 0.0:
        raise PeftlabError(f"temperature must be > 0 (1.0 = no softening), got {temperature}.")
    if not 0.0 <= alpha <= 1.0:
        raise PeftlabError(f"alpha must be in [0, 1] (weight of the hard-label CE), got {alpha}.")


def _kernel_kind(kind: str, beta: float) -> int:
    """TRL's special cases: JSD with β = 0 is forward KL, with β = 1 reverse KL."""
    if kind == "jsd" and beta == 0.0:
        return 0
    if kind == "jsd" and beta == 1.0:
        return 1
    return _KINDS[kind]


def divergence(log_ps: torch.Tensor, log_pt: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-row D between normalised log-probabilities (last dim); 0·log 0 terms count as 0."""
    k = _kernel_kind(kind, beta)
    if k == 0:
        pt = log_pt.exp()
        return torch.where(pt > 0, pt * (log_pt - log_ps), 0.0).sum(-1)
    if k == 1:
        ps = log_ps.exp()
        return torch.where(ps > 0, ps * (log_ps - log_pt), 0.0).sum(-1)
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    pt, ps = log_pt.exp(), log_ps.exp()
    kl_t = torch.where(pt > 0, pt * (log_pt - log_m), 0.0).sum(-1)
    kl_s = torch.where(ps > 0, ps * (log_ps - log_m), 0.0).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def _kd_rows_math(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, *, kind: str, beta: float,
                  temperature: float, alpha: float, ignore_index: int) -> torch.Tensor:
    """Per-row KD loss on full-vocab logits (rows × V), 0 at ignored rows. Differentiable in s."""
    valid = labels != ignore_index
    ce = F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="none")
    d = divergence(F.log_softmax(s / temperature, -1), F.log_softmax(t.to(s.dtype) / temperature, -1),
                   kind, beta)
    return torch.where(valid, alpha * ce + (1.0 - alpha) * temperature**2 * d, 0.0)


def _torch_rows_from_autograd(math_fn):
    """Row function for the chunk driver from a differentiable per-row loss ``math_fn(s, labels, *extra)``:
    the gradient wrt the chunk's logits comes from autograd on the chunk only (a few chunk-sized
    temporaries, never the whole vocab × tokens)."""

    def row_fn(logits, labels, *rest):
        *extra, scale, compute_grad = rest
        with torch.enable_grad():
            s = logits.detach().requires_grad_(compute_grad)
            loss = math_fn(s, labels, *extra)
            if compute_grad:
                (g,) = torch.autograd.grad(loss, s, grad_outputs=scale.to(loss.dtype))
                logits.copy_(g)
        return loss.detach()

    return row_fn


if _HAS_TRITON:

    @triton.jit
    def _kd_row_kernel(s_ptr, stride_s, t_ptr, stride_t, labels_ptr, scale_ptr, loss_ptr, V, ignore_index,
                       alpha, inv_temp, temp_sq, beta, log_beta, log_one_minus_beta, compute_grad,
                       KIND: tl.constexpr, BLOCK_V: tl.constexpr):
        """One program per row. s (student, fp32) is overwritten by scale·dL/ds when compute_grad; t is the
        teacher's fp32 logits row. KIND: 0 forward KL, 1 reverse KL, 2 JSD. Three passes over vocab
        blocks: (1) online logsumexp of s, s/T, t/T; (2) the divergence sums; (3) the gradient (reverse
        KL and JSD need the full-row KL before any gradient element is known)."""
        row = tl.program_id(0).to(tl.int64)
        s_base = s_ptr + row * stride_s
        t_base = t_ptr + row * stride_t
        y = tl.load(labels_ptr + row)
        valid = y != ignore_index
        m1 = tl.zeros((), dtype=tl.float32) - float("inf")
        d1 = tl.zeros((), dtype=tl.float32)
        m2 = tl.zeros((), dtype=tl.float32) - float("inf")
        d2 = tl.zeros((), dtype=tl.float32)
        m3 = tl.zeros((), dtype=tl.float32) - float("inf")
        d3 = tl.zeros((), dtype=tl.float32)
        for i in range(0, tl.cdiv(V, BLOCK_V)):  # noqa: PIE808 (interpreter-friendly form)
            offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
            mask = offs < V
            s = tl.load(s_base + offs, mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(t_base + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            n1 = tl.maximum(m1, tl.max(s, axis=0))
            d1 = d1 * tl.exp(m1 - n1) + tl.sum(tl.exp(s - n1), axis=0)
            m1 = n1
            st = s * inv_temp
            n2 = tl.maximum(m2, tl.max(st, axis=0))
            d2 = d2 * tl.exp(m2 - n2) + tl.sum(tl.exp(st - n2), axis=0)
            m2 = n2
            n3 = tl.maximum(m3, tl.max(t, axis=0))
            d3 = d3 * tl.exp(m3 - n3) + tl.sum(tl.exp(t - n3), axis=0)
            m3 = n3
        lse_s = m1 + tl.log(d1)
        lse_st = m2 + tl.log(d2)
        lse_tt = m3 + tl.log(d3)
        sy = tl.load(s_base + tl.where(valid, y, 0)).to(tl.float32)
        ce = lse_s - sy
        kl_a = tl.zeros((), dtype=tl.float32)  # fwd: KL(t‖s); rev: KL(s‖t); jsd: KL(t‖m)
        kl_b = tl.zeros((), dtype=tl.float32)  # jsd: KL(s‖m)
        for i in range(0, tl.cdiv(V, BLOCK_V)):  # noqa: PIE808
            offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
            mask = offs < V
            ls = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse_st
            lt = tl.load(t_base + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse_tt
            ps = tl.where(mask, tl.exp(ls), 0.0)
            pt = tl.where(mask, tl.exp(lt), 0.0)
            if KIND == 0:
                kl_a += tl.sum(pt * (lt - ls), axis=0)
            elif KIND == 1:
                kl_a += tl.sum(ps * (ls - lt), axis=0)
            else:
                a = lt + log_beta
                b = ls + log_one_minus_beta
                mx = tl.maximum(a, b)
                lm = mx + tl.log(1.0 + tl.exp(tl.minimum(a, b) - mx))
                kl_a += tl.sum(pt * (lt - lm), axis=0)
                kl_b += tl.sum(ps * (ls - lm), axis=0)
        if KIND == 2:
            div = beta * kl_a + (1.0 - beta) * kl_b
        else:
            div = kl_a
        loss = tl.where(valid, alpha * ce + (1.0 - alpha) * temp_sq * div, 0.0)
        tl.store(loss_ptr + row, loss)
        if compute_grad:  # runtime flag (uniform per row): one compiled variant per KIND
            scale = tl.where(valid, tl.load(scale_ptr + row).to(tl.float32), 0.0)
            kd_w = (1.0 - alpha) * temp_sq * inv_temp  # T²/T: chain rule of s/T
            for i in range(0, tl.cdiv(V, BLOCK_V)):  # noqa: PIE808
                offs = i * BLOCK_V + tl.arange(0, BLOCK_V)
                mask = offs < V
                s = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32)
                lt = tl.load(t_base + offs, mask=mask, other=0.0).to(tl.float32) * inv_temp - lse_tt
                ls = s * inv_temp - lse_st
                ps = tl.exp(ls)
                if KIND == 0:
                    g_kd = ps - tl.exp(lt)
                elif KIND == 1:
                    g_kd = ps * (ls - lt - kl_a)
                else:
                    a = lt + log_beta
                    b = ls + log_one_minus_beta
                    mx = tl.maximum(a, b)
                    lm = mx + tl.log(1.0 + tl.exp(tl.minimum(a, b) - mx))
                    g_kd = (1.0 - beta) * ps * (ls - lm - kl_b)
                g_ce = tl.exp(s - lse_s)
                g_ce = tl.where(offs == y, g_ce - 1.0, g_ce)
                g = alpha * g_ce + kd_w * g_kd
                tl.store(s_base + offs, g * scale, mask=mask)


def kd_row_launch(kind: int) -> tuple[dict, int, int]:
    """(constexprs, num_warps, num_stages) of ``_kd_row_kernel``: the dispatch and the AOT test use it."""
    return {"KIND": kind, "BLOCK_V": ROW_BLOCK_V}, ROW_NUM_WARPS, 3


def aot_launches(dtype: torch.dtype) -> list[tuple]:
    """Every launch of the KD loss for inputs of ``dtype``: the shared logits GEMM (student and teacher)
    and the KD row kernel for each kind, with and without gradient."""
    from peftlab.kernels.fused_linear_cross_entropy import aot_launches as ce_launches

    gemms = [launch for launch in ce_launches(dtype) if launch[0].__name__ == "_logits_kernel"]
    sig = {"s_ptr": "*fp32", "stride_s": "i32", "t_ptr": "*fp32", "stride_t": "i32", "labels_ptr": "*i64",
           "scale_ptr": "*fp32", "loss_ptr": "*fp32", "V": "i32", "ignore_index": "i32", "alpha": "fp32",
           "inv_temp": "fp32", "temp_sq": "fp32", "beta": "fp32", "log_beta": "fp32",
           "log_one_minus_beta": "fp32", "compute_grad": "i32"}
    rows = []
    for kind in (0, 1, 2):
        cx, nw, ns = kd_row_launch(kind)
        rows.append((_kd_row_kernel, sig, cx, nw, ns))
    return gemms + rows


def _triton_kd_rows(kind: int, beta: float, temperature: float, alpha: float, ignore_index: int):
    def row_fn(s, labels, t, scale, compute_grad):
        rows, v = s.shape
        loss = torch.empty(rows, device=s.device, dtype=torch.float32)
        constexprs, num_warps, num_stages = kd_row_launch(kind)
        _kd_row_kernel[(rows,)](
            s, s.stride(0), t, t.stride(0), labels.contiguous(), scale.to(torch.float32).contiguous(), loss,
            v, ignore_index, float(alpha), 1.0 / temperature, float(temperature) ** 2, float(beta),
            math.log(beta) if beta > 0 else 0.0, math.log1p(-beta) if beta < 1 else 0.0, int(compute_grad),
            **constexprs, num_warps=num_warps, num_stages=num_stages,
        )
        return loss

    return row_fn


# The online KD keeps about this many slice-sized buffers alive at once (student and teacher logits, their
# exponentials), so its slices are this much narrower than the CE's.
KD_ONLINE_BUFFERS = 4


def torch_kd_online(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                    scale: torch.Tensor, compute_grad: bool, *, teacher_hidden: torch.Tensor,
                    teacher_head: torch.Tensor, teacher_bias: torch.Tensor | None, temperature: float,
                    alpha: float, ignore_index: int,
                    chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact forward-KL KD loss (and scale·dloss/dhidden) of a frozen student head kept in 16 bits, vocabulary outer.

    The online counterpart of the row chunks for ``model.frozen_16bit`` on the PyTorch path (see
    :func:`~peftlab.kernels.fused_linear_cross_entropy.torch_ce_online`): row chunks upcast the student head
    twice and the teacher head once per chunk, and at a 128k vocabulary a chunk is ~65 rows. Rows go in blocks
    of ``chunk_rows`` (default ``ONLINE_ROWS``); each block reads both heads one vocabulary slice at a time, in
    one pass: with p = softmax(·/T), ``KL(p_t‖p_s) = Σ p_t·(t - s)/T - lse(t/T) + lse(s/T)``, so the softmax
    statistics of s, s/T and t/T and the p_t-weighted sum of (t - s)/T are accumulated online, and
    ``dloss/dh = α·(E_softmax(s)[W] - W_y) + (1-α)·T·(E_{p_s}[W] - E_{p_t}[W])`` from three (two at T = 1) online
    sums of head rows: four GEMMs per slice at T = 1 against the row chunks' three, no per-chunk upcasts.

    Reverse KL and JSD keep the row chunks: their gradient needs the normalised distributions (JSD's mixture has
    no online form), so vocabulary-outer they take two passes and five to six GEMMs per slice, which measured
    slower than the row chunks (1,024 tokens, V = 128,256, H = 768, one thread: 15-16 s against 13-14 s).
    """
    n, hdim = hidden.shape
    v = weight.shape[0]
    cd = compute_dtype(hidden, weight)
    loss = torch.empty(n, device=hidden.device, dtype=cd)
    grad_h = torch.empty((n, hdim), device=hidden.device, dtype=cd) if compute_grad else None
    rows, _ = online_block(n, v, cd.itemsize, chunk_rows)
    inv_t = 1.0 / temperature

    def slices(h: torch.Tensor, ht: torch.Tensor, width: int):
        """(head rows, student logits, teacher logits / T) of each vocabulary slice, heads upcast per slice."""
        for v0 in range(0, v, width):
            w, s = slice_logits(h, weight, bias, v0, width, cd)
            t = slice_logits(ht, teacher_head, teacher_bias, v0, width, cd)[1]  # the teacher's rows: not kept
            yield v0, w, s, t.mul_(inv_t)

    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        h, ht = hidden[sl].detach().to(cd), teacher_hidden[sl].to(cd)
        valid = labels[sl] != ignore_index
        y = torch.where(valid, labels[sl], 0)
        read = functools.partial(slices, h, ht, online_slice(h.shape[0], v, cd.itemsize * KD_ONLINE_BUFFERS))
        ce, div, grad = _forward_kl_block(read, h, y, temperature=temperature, alpha=alpha, need_grad=compute_grad)
        loss[sl] = torch.where(valid, alpha * ce + (1.0 - alpha) * temperature**2 * div, 0.0)
        if grad_h is not None:
            if alpha:
                grad.sub_(weight.index_select(0, y).to(cd), alpha=alpha)  # the CE's -W_y
            grad_h[sl] = grad.mul_(torch.where(valid, scale[sl].to(cd), 0.0).unsqueeze(1))
    return loss, grad_h


def _forward_kl_block(read, h: torch.Tensor, y: torch.Tensor, *, temperature: float, alpha: float, need_grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(CE, KL(p_t‖p_s), unscaled dloss/dh without the CE's -W_y) of one row block, one pass (see torch_kd_online).
    ``read()`` yields (vocabulary start, head rows, student logits, teacher logits / T) slice by slice."""
    r, hdim = h.shape
    inv_t = 1.0 / temperature
    kd = alpha < 1.0  # the divergence has a gradient
    s1 = OnlineSoftmax(r, hdim, h, need_grad and (alpha > 0 or temperature == 1.0))  # softmax(s): CE, p_s at T = 1
    st = OnlineSoftmax(r, hdim, h, need_grad and kd) if temperature != 1.0 else s1  # p_s = softmax(s/T)
    tt = OnlineSoftmax(r, hdim, h, need_grad and kd)  # p_t = softmax(t/T)
    x = torch.zeros(r, device=h.device, dtype=h.dtype)  # Σ exp(t/T - m_t)·(t - s)/T, rescaled with tt
    s_y = torch.zeros_like(x)
    for v0, w, s, t in read():
        s_y = gather_target(s, y, v0, s_y)
        s1.add(s, w)
        if st is not s1:
            s.mul_(inv_t)
            st.add(s, w)
        e_t, rescale = tt.add(t, w)
        x.mul_(rescale).add_((e_t * t.sub_(s)).sum(1))  # s is s/T by now
    div = x / tt.l - tt.lse() + st.lse()
    grad = None
    if need_grad:
        kd_w = (1.0 - alpha) * temperature  # (1-α)·T²·(1/T): the chain rule of s/T
        grad = torch.zeros_like(h)
        if s1.rows is not None:
            grad.add_(s1.expected_row(), alpha=alpha + (kd_w if st is s1 else 0.0))
        if st is not s1 and st.rows is not None:
            grad.add_(st.expected_row(), alpha=kd_w)
        if tt.rows is not None:
            grad.sub_(tt.expected_row(), alpha=kd_w)
    return s1.lse() - s_y, div, grad


def _check_teacher(student_head: torch.Tensor, teacher_hidden: torch.Tensor, teacher_head: torch.Tensor,
                   student_hidden: torch.Tensor, teacher_bias: torch.Tensor | None) -> torch.Tensor:
    if teacher_head.dim() != 2 or teacher_head.shape[0] != student_head.shape[0]:
        raise PeftlabError(
            f"teacher head {tuple(teacher_head.shape)} and student head {tuple(student_head.shape)} must share "
            "the vocabulary (dim 0); distill between models with the same tokenizer."
        )
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise PeftlabError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden {tuple(student_hidden.shape)} must "
            "have the same token dims (only the hidden size may differ)."
        )
    th, _ = flatten_inputs(teacher_hidden, teacher_head, torch.zeros(teacher_hidden.shape[:-1], dtype=torch.long),
                           teacher_bias, what="teacher_hidden")
    return th.detach()


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    reduction: str = "sum",
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """α·CE + (1-α)·T²·D over non-ignored tokens, chunked over rows (see the module docstring for D).

    student_hidden (..., Hs), student_head (V, Hs), teacher_hidden (..., Ht), teacher_head (V, Ht),
    labels (...) int64 already shifted. Gradients flow to the student hidden/head/bias only; the
    teacher's logits are computed per chunk without grad. reduction/normalizer/backend/chunk_size as
    in :func:`fused_linear_cross_entropy`. Returns fp32 (fp64 for fp64 inputs).
    """
    check_reduction(reduction, normalizer)
    _check_kd_options(kind, beta, temperature, alpha)
    h2, y = flatten_inputs(student_hidden, student_head, labels, student_bias, what="student_hidden")
    th = _check_teacher(student_head, teacher_hidden, teacher_head, student_hidden, teacher_bias)
    teacher_head, teacher_bias = teacher_head.detach(), teacher_bias.detach() if teacher_bias is not None else None
    be = resolve_backend(backend, h2, student_head, th, teacher_head)
    v = student_head.shape[0]
    check_labels(y, v, ignore_index)
    rows = chunk_size or default_chunk_rows(h2.shape[0], max(h2.shape[1], th.shape[1]), v, n_heads=2, gpu=h2.is_cuda)
    if rows < 1:
        raise PeftlabError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
    cd = compute_dtype(h2, student_head)
    logits_fn = triton_logits if be == "triton" else torch_logits

    def teacher_logits(sl: slice) -> tuple[torch.Tensor]:
        with torch.no_grad():
            return (logits_fn(th[sl], teacher_head, teacher_bias).to(cd),)

    if be == "triton":
        row_fn = _triton_kd_rows(_kernel_kind(kind, beta), beta, temperature, alpha, ignore_index)
    else:
        row_fn = _torch_rows_from_autograd(
            lambda s, lab, t: _kd_rows_math(s, t, lab, kind=kind, beta=beta, temperature=temperature,
                                            alpha=alpha, ignore_index=ignore_index))

    def online(h, weight, bias, lab, scale, compute_grad):
        return torch_kd_online(h, weight, bias, lab, scale, compute_grad, teacher_hidden=th,
                               teacher_head=teacher_head, teacher_bias=teacher_bias, temperature=temperature,
                               alpha=alpha, ignore_index=ignore_index, chunk_rows=chunk_size)

    row_weight = reduction_scale(y != ignore_index, reduction, normalizer, cd)
    loss = chunked_loss(h2, student_head, student_bias, y, row_weight, row_fn, be, rows, reduction,
                        teacher_logits, online if _kernel_kind(kind, beta) == 0 else None)  # see torch_kd_online
    return finish_reduction(loss, reduction, labels.shape)


def reference_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    reduction: str = "sum",
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch reference with the same signature: full fp32 student and teacher logits + autograd."""
    del backend, chunk_size
    check_reduction(reduction, normalizer)
    _check_kd_options(kind, beta, temperature, alpha)
    cd = compute_dtype(student_hidden, student_head)
    v = student_head.shape[0]
    s = reference_logits(student_hidden, student_head, student_bias, cd).reshape(-1, v)
    with torch.no_grad():
        t = reference_logits(teacher_hidden, teacher_head, teacher_bias, cd).reshape(-1, v)
    y = labels.reshape(-1)
    per_token = _kd_rows_math(s, t, y, kind=kind, beta=beta, temperature=temperature, alpha=alpha,
                              ignore_index=ignore_index)
    return reference_reduction(per_token, y != ignore_index, reduction, normalizer, labels.shape)


def topk_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    reduction: str = "sum",
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Offline distillation from stored teacher top-k log-probabilities (chunked PyTorch path).

    teacher_topk_logprobs (..., k) are log-probabilities of the teacher at temperature 1 (as vLLM / HF
    ``generate`` store them) for the ids in teacher_topk_ids (..., k). Temperature is applied to the
    stored log-probs and the result renormalised over the k ids: p_t = softmax_k(logprob / T), which
    equals the teacher's softmax(t / T) restricted to those ids and renormalised (the teacher's
    log-partition is a per-row constant that cancels). The student distribution is renormalised over
    the SAME k ids (p_s = softmax_k(s_ids / T)), so every kind (reverse KL and JSD included) is finite;
    the hard-label CE term uses the full student softmax at T = 1. With k = V this is exactly
    :func:`fused_linear_kd_loss`. Entries of -inf (padding when fewer than k were stored) get zero
    teacher mass.
    """
    check_reduction(reduction, normalizer)
    _check_kd_options(kind, beta, temperature, alpha)
    h2, y = flatten_inputs(student_hidden, student_head, labels, student_bias, what="student_hidden")
    k = teacher_topk_ids.shape[-1]
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape or tuple(teacher_topk_ids.shape[:-1]) != tuple(
            labels.shape):
        raise PeftlabError(
            f"teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)} and teacher_topk_ids "
            f"{tuple(teacher_topk_ids.shape)} must both be labels.shape + (k,) = {(*labels.shape, k)}."
        )
    v = student_head.shape[0]
    ids = teacher_topk_ids.reshape(-1, k).long()
    if bool(((ids < 0) | (ids >= v)).any()):
        raise PeftlabError(f"teacher_topk_ids must be in [0, {v}); check the teacher shares the student's vocab.")
    cd = compute_dtype(h2, student_head)
    lp = teacher_topk_logprobs.reshape(-1, k).detach().to(cd)
    check_labels(y, v, ignore_index)
    rows = chunk_size or default_chunk_rows(h2.shape[0], h2.shape[1], v, gpu=h2.is_cuda)

    def kd_part(s_ids: torch.Tensor, lab: torch.Tensor, lp_c: torch.Tensor) -> torch.Tensor:
        log_pt = F.log_softmax(lp_c / temperature, -1)
        d = divergence(F.log_softmax(s_ids / temperature, -1), log_pt, kind, beta)
        return torch.where(lab != ignore_index, (1.0 - alpha) * temperature**2 * d, 0.0)

    def math_fn(s: torch.Tensor, lab: torch.Tensor, lp_c: torch.Tensor, ids_c: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(s, lab, ignore_index=ignore_index, reduction="none")
        return alpha * ce + kd_part(s.gather(1, ids_c), lab, lp_c)

    def online(h, weight, bias, lab, scale, compute_grad):
        return torch_topk_kd_online(h, weight, bias, lab, scale, compute_grad, ids=ids, kd_part=lambda s_ids, sl: kd_part(
            s_ids, lab[sl], lp[sl]), alpha=alpha, ignore_index=ignore_index, chunk_rows=chunk_size)

    row_weight = reduction_scale(y != ignore_index, reduction, normalizer, cd)
    loss = chunked_loss(h2, student_head, student_bias, y, row_weight, _torch_rows_from_autograd(math_fn), "torch",
                        rows, reduction, lambda sl: (lp[sl], ids[sl]), online)
    return finish_reduction(loss, reduction, labels.shape)


# Rows of one gather block of the top-k online path: their gathered head rows (rows × k × H) stay near 16 MB.
TOPK_GATHER_BYTES = 16 << 20


def torch_topk_kd_online(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                         scale: torch.Tensor, compute_grad: bool, *, ids: torch.Tensor, kd_part, alpha: float,
                         ignore_index: int, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Offline distillation's loss over a frozen 16-bit student head without full-vocabulary row chunks.

    The loss is α·CE + KD(s at the teacher's k ids). The CE is exactly
    :func:`~peftlab.kernels.fused_linear_cross_entropy.torch_ce_online` (vocabulary outer, each head slice upcast
    once per row block), skipped when α = 0; the divergence needs the student's logits at k ids only, so it
    gathers those k head rows per token (``s_ids = W[ids] · h``, rows × k × H, a few rows at a time) and folds
    its gradient back through the same rows — k·H work per token instead of V·H. ``kd_part(s_ids, rows)`` is the
    per-row divergence term (differentiable in s_ids, 0 at ignored rows).
    """
    n, hdim = hidden.shape
    cd = compute_dtype(hidden, weight)
    if alpha:
        loss, grad_h = torch_ce_online(hidden, weight, bias, labels, scale * alpha, CEOptions(ignore_index=ignore_index),
                                       compute_grad, chunk_rows)
        loss = loss * alpha
    else:
        loss = torch.zeros(n, device=hidden.device, dtype=cd)
        grad_h = torch.zeros((n, hdim), device=hidden.device, dtype=cd) if compute_grad else None
    k = ids.shape[1]
    step = max(1, TOPK_GATHER_BYTES // max(1, k * hdim * cd.itemsize))
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        w_ids = weight[ids[sl].reshape(-1)].to(cd).view(-1, k, hdim)  # rows × k × H
        h = hidden[sl].detach().to(cd)
        with torch.enable_grad():
            s_ids = torch.bmm(w_ids, h.unsqueeze(2)).squeeze(2).requires_grad_(compute_grad)
            if bias is not None:
                s_ids = s_ids + bias[ids[sl]].to(cd)
            part = kd_part(s_ids, sl)
            if compute_grad:
                (g,) = torch.autograd.grad(part, s_ids, grad_outputs=scale[sl].to(part.dtype))
                grad_h[sl] += torch.bmm(g.unsqueeze(1), w_ids).squeeze(1)
        loss[sl] += part.detach()
    return loss, grad_h

