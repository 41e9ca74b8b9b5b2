"""The loss head's share of the planner's peak (:mod:`peftlab.engine.planner`): which path the cross-entropy over the
output head takes, decided by the loss's own rule, and its working set on that path.

:func:`~peftlab.kernels.fused_linear_cross_entropy` (and the KD losses, :mod:`peftlab.engine.planner_distill`)
run one of three paths: Triton row chunks where ``kernels`` takes the kernel path, the PyTorch vocabulary-outer
pass (``torch_ce_online``) where the head is stored below the loss's fp32 compute dtype and gets no gradient
(``model.frozen_16bit`` on an fp32 CPU run, any 16-bit run with ``kernels: torch`` or on the CPU), PyTorch row
chunks otherwise; ``kernels: off`` makes whole logits. :func:`head_online` asks the dispatcher's own predicate
(``online_applies``) rather than restating it.
"""
from __future__ import annotations

from typing import Any

import torch

from peftlab.engine.model_shape import ModelShape, kernels_run_triton
from peftlab.kernels.fused_linear_cross_entropy import default_chunk_rows, online_applies, online_block

ELEM_DTYPES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}  # a compute dtype by its size (fp16: as bf16)


def loss_backend(recipe: Any, device: str) -> str:
    """``triton`` or ``torch``: the backend the fused losses resolve the recipe's ``kernels`` to on ``device``
    (``auto`` on CUDA without Triton installed: ``torch``, :func:`~peftlab.engine.model_shape.kernels_run_triton`)."""
    return "triton" if kernels_run_triton(recipe.kernels, device) else "torch"


def head_online(shape: ModelShape, *, elem: int, backend: str) -> bool:
    """Whether a loss over the output head on ``backend`` takes the vocabulary-outer pass (``torch_ce_online``,
    ``torch_kd_online``, ``torch_topk_kd_online``) instead of row chunks: the chunk driver's own rule asked with
    meta tensors of the run's dtypes — hidden states in the compute dtype (``elem`` bytes), the head in 16 bits
    under ``model.frozen_16bit`` (``shape.head_16bit``) or else in the compute dtype — and whether the head trains
    (``adapter.unfreeze``: ``shape.head_trainable``)."""
    compute = ELEM_DTYPES[elem]
    hidden = torch.empty(0, dtype=compute, device="meta")
    head = torch.empty(0, dtype=torch.bfloat16 if shape.head_16bit else compute, device="meta")
    return online_applies(backend, hidden, head, shape.head_trainable, shape.head_trainable)


def head_gradient_bytes(shape: ModelShape, *, elem: int, grad_accum: int) -> tuple[int, int]:
    """(forward, backward) bytes a trained head (``adapter.unfreeze``) adds to a fused loss beyond its ``.grad``
    (the planner's ``gradients``): its fp32 gradient, accumulated over the chunks in the forward; in the backward that
    and its copy scaled by the upstream gradient, cast to the head's dtype below fp32. With ``grad_accum`` 1 the
    result becomes the ``.grad`` (none exists before it: the optimizer sets it to None), so that share is not
    counted twice; from a step's second micro-batch on the ``.grad`` of the previous ones is alive beside it."""
    if not shape.head_trainable:
        return 0, 0
    vh = shape.vocab * shape.hidden
    becomes_grad = vh * elem if grad_accum == 1 else 0
    return 4 * vh - becomes_grad, 8 * vh + (vh * elem if elem < 4 else 0) - becomes_grad


def ce_loss_head(recipe: Any, shape: ModelShape, *, device: str, elem: int, n_tokens: int) -> tuple[int, int, str]:
    """(bytes at the loss's forward, bytes at its backward, the path in words) of the plain cross-entropy over
    ``n_tokens`` rows. The fused paths make the fp32 hidden-state gradient in the forward; their backward holds it,
    its scaled copy and the compute-dtype result."""
    H, vocab = shape.hidden, shape.vocab
    if recipe.kernels == "off":  # whole fp32 logits, their log-softmax and their gradient: alive into backward
        fwd = 3 * n_tokens * vocab * 4 + (n_tokens * vocab * elem if elem != 4 else 0)
        return fwd, fwd + n_tokens * H * elem, "whole logits (kernels: off)"
    head_fwd, head_bwd = head_gradient_bytes(shape, elem=elem, grad_accum=recipe.train.grad_accum)
    bwd = n_tokens * H * (4 + 4 + elem) + head_bwd
    backend = loss_backend(recipe, device)
    if head_online(shape, elem=elem, backend=backend):
        # one block's logits slice (exp'd in place), the slice of the head upcast, the block's hidden states upcast
        # to fp32 (a 16-bit run), the hidden-state gradient made in forward
        rows, width = online_block(n_tokens, vocab, 4)
        fwd = rows * width * 4 + width * H * 4 + (rows * H * 4 if elem < 4 else 0) + n_tokens * H * 4
        # (a trained head never takes this path: head_gradient_bytes is 0 here)
        return fwd, bwd, f"vocabulary-outer (torch_ce_online), {rows} rows x {width} vocabulary rows"
    rows = default_chunk_rows(n_tokens, H, vocab, gpu=device == "cuda")
    chunk = rows * vocab * 4  # one chunk of fp32 logits
    if backend == "triton":  # the row kernel makes the gradient in place; a 16-bit head's GEMMs read a 16-bit copy
        logits = chunk + (rows * vocab * 2 if shape.head_16bit or elem < 4 else 0)
    else:  # the logits (their gradient in place) and logsumexp's temporary; a soft-cap keeps tanh(z / c) as well
        softcap = recipe.train.loss.softcap is not None or shape.logit_softcap is not None
        logits = (3 if softcap else 2) * chunk
    # measured with torch.profiler (tests/engine/test_planner_terms.py), + the hidden-state gradient made in forward
    fwd = logits + n_tokens * H * 4 + head_fwd
    return fwd, bwd, f"{'Triton' if backend == 'triton' else 'PyTorch'} row chunks of {rows}"
