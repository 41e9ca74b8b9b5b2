"""Does a run fit its memory: the memory it may use (:func:`default_budget`, :func:`usable_memory`),
``train.auto_fit`` (:func:`apply_auto_fit`: shrink the micro-batch, then the sequence length, to what the
planner says fits) and, after a run ran out of memory, what the planner predicts and the recipe keys that
lower it (:func:`out_of_memory_advice`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from peftlab.engine.estimate_report import does_not_fit_message, fmt
from peftlab.engine.model_shape import model_shape
from peftlab.engine.planner import (
    compute_dtype,
    estimate,
    fused_norm_saves,
    grad_accum_keeping_batch,
    run_device,
)
from peftlab.errors import PeftlabError
from peftlab.objectives.teacher import teacher_quantization

logger = logging.getLogger(__name__)


def default_budget(device: str) -> int:
    """The memory a run may use here: free GPU memory, or available host memory plus nothing else."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def usable_memory(device: str) -> int:
    """What a run in THIS process can use now: free memory plus what the process already holds (its CUDA
    caching allocator's reservation, or its resident set on the CPU) — for a run that has just failed."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_reserved())
    import psutil

    return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)


def out_of_memory_advice(recipe: Any, *, device: str | None = None, budget: int | None = None) -> str:
    """For a run that ran out of memory: what the planner predicts for its recipe against the memory the
    process can use, what it predicts would fit, and the recipe keys that lower memory. Never raises:
    when the planner itself fails the figures are left out (the original failure matters more)."""
    t, d = recipe.train, recipe.data
    keys = [(f"train.micro_batch_size (now {t.micro_batch_size}; raise train.grad_accum, now {t.grad_accum}, to "
             "keep the batch)"), f"data.max_seq_len (now {d.max_seq_len})"]
    if not recipe.model.gradient_checkpointing:
        keys.append("model.gradient_checkpointing: true")
    elif not t.offload_activations and (device or run_device(recipe)) == "cuda":
        keys.append("train.offload_activations: true (checkpointed layer inputs in pinned host memory)")
    if t.mlp_chunk_tokens is None:
        keys.append("train.mlp_chunk_tokens: 4096 (the MLP run over the sequence in chunks)")
    if fused_norm_saves(recipe, device or run_device(recipe)):
        keys.append("train.fused_norm: true (RMSNorm without its fp32 copy and fp32 backward)")
    if recipe.quantization.mode == "none":
        keys.append("quantization.mode: nf4 (a 4-bit base)")
    if recipe.adapter.unfreeze:
        keys.append(f"adapter.unfreeze (now {recipe.adapter.unfreeze}: an unfrozen module's gradient and AdamW "
                    "state take 3x its weights)")
    kd = recipe.distill
    if kd is not None and kd.mode == "online":
        if teacher_quantization(recipe, missing_ok=True).mode == "none":  # its own, its adapter's or the recipe's
            keys.append("distill.teacher.quantization: {mode: nf4} (a 4-bit teacher)")
        keys.append("distill.mode: offline (`peftlab distill-cache` stores the teacher's top-k once; training then "
                    "does not load the teacher)")
    if not t.auto_fit:
        keys.append("train.auto_fit: true (shrinks micro_batch_size, then max_seq_len, to what the planner says "
                    "fits)")
    try:
        device = device or run_device(recipe)
        usable = budget if budget is not None else usable_memory(device)
        est = estimate(recipe, device_memory=usable, device=device)
        figures = (f"`peftlab estimate` predicts a peak of {fmt(est.total)} for this recipe (micro_batch_size="
                   f"{est.micro_batch_size}, max_seq_len={est.seq_len}) against {fmt(usable)} this process can use "
                   f"on the {device} (free now + what it holds)")
        fits = []
        if est.max_micro_batch_size and est.max_micro_batch_size < t.micro_batch_size:
            fits.append(f"train.micro_batch_size: {est.max_micro_batch_size}")
        if est.max_seq_len and est.max_seq_len < d.max_seq_len:
            fits.append(f"data.max_seq_len: {est.max_seq_len}")
        if fits:
            figures += "; it predicts a fit with " + " or ".join(fits)
        elif est.fits:
            figures += ("; that prediction fits, so the memory went elsewhere (other processes on this machine, "
                        "or a component the planner does not count)")
        else:
            figures += "; nothing it can shrink fits"
    except Exception as exc:  # noqa: BLE001 — the planner failing must not hide the original failure
        figures = f"(the memory planner failed too: {type(exc).__name__}; run `peftlab estimate RECIPE` later)"
    return figures + ". Recipe keys that lower memory: " + "; ".join(keys) + "."


def apply_auto_fit(recipe: Any, *, device_memory: int | None = None) -> Any:
    """``train.auto_fit``: shrink micro_batch_size (keeping micro_batch_size x grad_accum) and then
    max_seq_len until the planner says the run fits (what changed is logged); raise when nothing fits.
    Returns the recipe."""
    est0 = estimate(recipe, device_memory=1)  # shape + baseline once
    device = est0.device
    budget = device_memory or default_budget(device)
    shape = model_shape(recipe, compute_dtype(recipe, device))
    base = est0.components["baseline"]
    est = estimate(recipe, device_memory=budget, shape=shape, baseline=base, device=device)
    if est.fits:
        return recipe
    t = recipe.train
    if est.max_micro_batch_size:
        mbs = est.max_micro_batch_size
        t.micro_batch_size, t.grad_accum = mbs, grad_accum_keeping_batch(t.micro_batch_size, t.grad_accum, mbs)
        peak = estimate(recipe, device_memory=budget, shape=shape, baseline=base, device=device).total
        logger.info("auto_fit: micro_batch_size -> %d, grad_accum -> %d (predicted peak %s of %s)", mbs,
                    t.grad_accum, fmt(peak), fmt(budget))
        return recipe
    one = estimate(recipe, device_memory=budget, shape=shape, baseline=base, device=device, micro_batch_size=1)
    if one.max_seq_len and one.max_seq_len >= 2:
        t.micro_batch_size = 1
        recipe.data.max_seq_len = one.max_seq_len
        logger.info("auto_fit: micro_batch_size -> 1, data.max_seq_len -> %d (longer rows are %sd)",
                    one.max_seq_len, recipe.data.overlength)
        return recipe
    raise PeftlabError(does_not_fit_message(one))
