"""Distillation's share of the planner's peak (a recipe with a ``distill:`` section).

Online (:class:`~peftlab.objectives.distillation.OnlineDistillLoss`), per micro-batch: the teacher's final hidden
states are made first, under ``no_grad`` (its layers' transients exist one layer at a time, before the student's
forward), and kept until the KD loss has run; the loss then reads both heads
(:func:`~peftlab.kernels.fused_linear_kd_loss`) on one of four paths — Triton row chunks (``kernels`` takes the
kernel path and Triton is installed: :func:`~peftlab.engine.model_shape.kernels_run_triton`), PyTorch row chunks,
the PyTorch vocabulary-outer pass (forward KL over a student head stored in 16 bits: ``torch_kd_online``), or whole
fp32 logits (``kernels: off``). Offline
(:class:`~peftlab.objectives.distillation.OfflineDistillLoss`): the batch's cached top-k log-probabilities (fp32)
and ids (int64) are read before the student's forward and kept until the loss has run
(:func:`~peftlab.kernels.topk_kd_loss`: PyTorch row chunks, or the online CE + gathered top-k rows over a 16-bit
head). The teacher's weights are counted like the student's (:func:`peftlab.engine.model_shape.count_model`) in
its own dtype and quantization, as :func:`~peftlab.objectives.teacher.load_teacher` loads it (never
``frozen_16bit``), with its frozen adapter in fp32.

The working sets of the PyTorch loss paths are fp32 ``rows × vocabulary`` buffers counted with torch.profiler's
memory timeline on the CPU (tests/engine/test_planner_distill.py checks each path against it); the Triton path's
are read from the code (the student and teacher chunk, the bf16 gradient chunk of its GEMMs).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from peftlab.engine.loss_head import head_gradient_bytes, head_online
from peftlab.engine.model_shape import ModelShape, count_model, kernels_run_triton, model_config
from peftlab.errors import PeftlabError
from peftlab.kernels.fused_linear_cross_entropy import default_chunk_rows, online_block, online_slice
from peftlab.kernels.fused_linear_kd_loss import KD_ONLINE_BUFFERS, TOPK_GATHER_BYTES

# Live fp32 (rows × vocabulary) buffers of one row chunk at the peak of the PyTorch KD loss (student and teacher
# logits, autograd's softmax / log-softmax / divergence temporaries and their gradients), by divergence; measured
# with torch.profiler's memory timeline (CPU, torch 2.13), the same at T = 1 and T = 2 and for fp32 / bf16 heads.
TORCH_KD_CHUNK_BUFFERS = {"forward_kl": 8.25, "reverse_kl": 9.25, "jsd": 13.5}
TRITON_KD_CHUNK_BUFFERS = 2.5  # student + teacher fp32 chunk (the row kernel works in place) + its bf16 gradient
TOPK_CHUNK_BUFFERS = 5.0  # top-k row chunks: the student's chunk, its log-softmax and their gradients (measured)
TOPK_GATHER_BUFFERS = 2.5  # gathered head rows (rows × k × H) and the bmm's gradient (measured)
# On the CPU with a heap allocator (train.host_allocator auto / default) the row chunks' buffers, below glibc's
# largest dynamic mmap threshold, come from the heap, and autograd's buffers of different lifetimes fragment it:
# peak RSS held this much more than the chunk's live working set. Fitted (tiny online-KD runs, 2 x 128 tokens,
# vocabulary 32,000, measured VmHWM minus the planner's other terms): forward KL 0.58, reverse KL 0.74 (auto) /
# 0.57 (default), JSD 0.56 — an empirical figure like planner.CPU_HEAP_RETENTION, not a derivation. The
# vocabulary-outer path reuses same-sized slices and measured none.
CPU_KD_HEAP_RETENTION = 0.6
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


@dataclass(frozen=True)
class Teacher:
    """What the planner knows of the teacher (online mode): its shape, counted, and its compute dtype's size."""

    shape: ModelShape
    elem: int
    label: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DistillMemory:
    """Distillation's bytes at each moment of a step (see the module docstring)."""

    teacher_weights: int   # the teacher's weights (online), for the whole run
    teacher_forward: int   # the teacher forward's transients (one micro-batch, no grad), before the student's
    teacher_outputs: int   # what the loss reads, alive from before the student's forward to the loss: the
    #                        teacher's hidden states (online) or the cached top-k log-probs and ids (offline)
    kd_loss_fwd: int       # the KD loss's working set while it runs (+ the student hidden-state gradient it makes)
    kd_loss_bwd: int       # its backward: the saved gradient, scaled, cast to the compute dtype
    path: str              # the loss path, in words
    teacher_outputs_bwd: int = 0  # teacher_outputs still alive in the loss's backward (weighted rows, see below)


def teacher_dtype(recipe: Any, device: str) -> torch.dtype:
    """The teacher's compute dtype as :func:`~peftlab.objectives.teacher.load_teacher` picks it (``distill.teacher.
    dtype``, else ``model.dtype``; ``auto``: bfloat16 on a GPU, float32 on the CPU)."""
    from peftlab.model.load import DTYPES

    name = recipe.distill.teacher.dtype or recipe.model.dtype
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device == "cuda" else torch.float32


def teacher_shape(recipe: Any, device: str) -> Teacher | None:
    """The online teacher of ``recipe.distill`` counted on the meta device (None without one): its base model in its
    dtype and quantization (:func:`~peftlab.objectives.teacher.teacher_quantization`) and its frozen adapter, from
    the adapter's ``adapter_config.json`` (when the adapter is not there yet it is left out, with a note)."""
    from peftlab.adapters.peft_format import read_adapter_config
    from peftlab.objectives.teacher import teacher_base_name, teacher_label, teacher_quantization

    d = recipe.distill
    if d is None or d.mode != "online":
        return None
    t = d.teacher
    dtype = teacher_dtype(recipe, device)
    config = model_config(teacher_base_name(recipe), t.revision, t.trust_remote_code)
    lora, notes = None, []
    if t.adapter:
        path = recipe.resolve_path(t.adapter)
        try:
            c = read_adapter_config(path)
        except PeftlabError:
            notes.append(f"distill.teacher.adapter {path} is not there yet: its weights are not counted"
                         + ("" if t.quantization else "; the teacher's quantization is taken to be the recipe's"))
        else:
            lora = {"r": c["r"], "alpha": c["lora_alpha"], "target_modules": c["target_modules"],
                    "use_rslora": bool(c.get("use_rslora")), "use_dora": bool(c.get("use_dora")),
                    "layers": c.get("layers_to_transform"), "layers_pattern": c.get("layers_pattern"),
                    "exclude_modules": c.get("exclude_modules"), "rank_pattern": c.get("rank_pattern"),
                    "alpha_pattern": c.get("alpha_pattern")}
    quant = teacher_quantization(recipe, missing_ok=True)  # an adapter not trained yet: the recipe's (noted above)
    shape = count_model(config, dtype, quant=quant, lora=lora,
                        trust_remote_code=t.trust_remote_code)
    return Teacher(shape, dtype.itemsize, teacher_label(recipe), tuple(notes))


def teacher_forward_bytes(t: ModelShape, *, elem: int, mbs: int, seq: int, attn: str) -> int:
    """Peak transients of the teacher's forward over one micro-batch under ``no_grad`` (read from transformers'
    Llama-family layer): the residual stream and the current hidden state, plus the largest of one RMSNorm (16 bits:
    its fp32 copy and product), the attention block (normed input, q/k/v, k/v repeated to every head for SDPA with a
    mask, the output and its contiguous copy; eager: the probabilities and their fp32 softmax) and the MLP (normed
    input, silu(gate), up and their product); one base weight dequantised (4-bit), the mask and RoPE's cos/sin."""
    n = mbs * seq
    H, inter = t.hidden, t.intermediate
    q_w, kv_w = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    norm = 8 * H + (2 * H * elem if elem < 4 else 0)
    attention = (H + 5 * q_w + 2 * kv_w) * elem
    if attn == "eager":  # two score-sized tensors at a time (scores, scaled / masked), + the softmax's fp32 in 16 bits
        attention += t.n_heads * seq * (2 * elem + (4 if elem < 4 else 0))
    mlp = (H + 3 * inter) * elem
    per_token = 2 * H * elem + max(norm, attention, mlp)
    mask = 0 if attn == "flash_attention_2" else mbs * seq * seq * (1 + (elem if attn == "sdpa" else 4))
    rope = 2 * n * t.head_dim * elem
    return n * per_token + t.largest_linear * elem + mask + rope


def _heap_retention(recipe: Any, device: str, work: float, buffer: int) -> float:
    """What the CPU heap holds beyond a row-chunked loss's live ``work`` (see CPU_KD_HEAP_RETENTION)."""
    if device != "cpu" or recipe.train.host_allocator == "bounded" or buffer > GLIBC_MMAP_THRESHOLD_MAX:
        return 0.0
    return CPU_KD_HEAP_RETENTION * work


def _kind(kind: str, beta: float) -> str:
    """TRL's special cases, as the kernel takes them: JSD with beta 0 is forward KL, with beta 1 reverse KL."""
    if kind == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return kind


def distill_memory(recipe: Any, shape: ModelShape, teacher: Teacher | None, *, device: str, elem: int, mbs: int,
                   seq: int) -> DistillMemory | None:
    """Distillation's bytes for ``mbs`` rows of ``seq`` tokens (None without a ``distill:`` section).

    ``shape`` is the student's, ``elem`` its compute dtype's size, ``teacher`` from :func:`teacher_shape`."""
    d = recipe.distill
    if d is None:
        return None
    n = mbs * seq
    hs = shape.hidden
    # a trained student head's gradient (adapter.unfreeze)
    head_fwd, head_bwd = head_gradient_bytes(shape, elem=elem, grad_accum=recipe.train.grad_accum)
    grad_h = n * hs * 4 + head_fwd  # the student hidden-state gradient, fp32, made in the loss's forward
    bwd = n * hs * (4 + 4 + elem) + head_bwd  # saved fp32 gradient, x grad_output, cast to the compute dtype
    # the student head stored below the loss's fp32 compute dtype and frozen: the vocabulary-outer passes (the top-k
    # loss always runs on PyTorch; the online KD loss where the Triton path is not taken, see below)
    head_online_torch = head_online(shape, elem=elem, backend="torch")
    if d.mode == "offline":
        vocab = shape.vocab
        k = min(d.top_k, vocab)
        cached = n * k * (4 + 8)  # TeacherCache.lookup: fp32 log-probs, int64 ids, (B, T, k)
        if head_online_torch:  # online CE (when alpha > 0) then the gathered top-k head rows, one block at a time
            rows, width = online_block(n, vocab, 4)
            ce = rows * width * 4 + width * hs * 4 if d.alpha else 0
            step = min(n, max(1, TOPK_GATHER_BYTES // max(1, k * hs * 4)))
            work, path = max(ce, TOPK_GATHER_BUFFERS * step * k * hs * 4), "top-k, online CE + gathered rows"
        else:
            rows = default_chunk_rows(n, hs, vocab, gpu=device == "cuda")
            work, path = TOPK_CHUNK_BUFFERS * rows * vocab * 4, f"top-k, row chunks of {rows}"
            work += _heap_retention(recipe, device, work, rows * vocab * 4)
        return _weighted(recipe, DistillMemory(0, 0, cached, math.ceil(work + grad_h), bwd, path), n * hs * elem)
    if teacher is None:
        raise PeftlabError("distill_memory: an online distill recipe needs the teacher's shape (teacher_shape)")
    t, te = teacher.shape, teacher.elem
    ht = t.hidden
    vocab = min(shape.vocab, t.vocab)  # shared_head_rows: the heads' common rows
    kind = _kind(d.kind, d.beta)
    outputs = n * ht * te  # the teacher's final hidden states
    if recipe.kernels == "off":  # the reference: whole fp32 logits of both heads and autograd's buffers
        work, path = TORCH_KD_CHUNK_BUFFERS[kind] * n * vocab * 4, "whole logits (kernels: off)"
        work += _heap_retention(recipe, device, work, n * vocab * 4)
        bwd = int(work) + n * hs * elem
    elif kernels_run_triton(recipe.kernels, device):  # else the loss resolves 'auto' to PyTorch
        rows = default_chunk_rows(n, max(hs, ht), vocab, n_heads=2, gpu=device == "cuda")
        work, path = TRITON_KD_CHUNK_BUFFERS * rows * vocab * 4, f"Triton row chunks of {rows}"
    elif head_online_torch and kind == "forward_kl":  # torch_kd_online: one row block, one vocabulary slice at a time
        rows, _ = online_block(n, vocab, 4)
        width = online_slice(rows, vocab, 4 * KD_ONLINE_BUFFERS)
        one = width >= vocab  # one slice: nothing of a previous slice is alive when the next is read
        slices = (1 if one else 2) * width * (hs * 4 + (ht * 4 if te < 4 else 0))  # heads' slices upcast
        upcast = rows * (hs * 4 + (ht * 4 if te < 4 else 0))  # the block's hidden states in fp32
        sums = rows * hs * 4 * (4 if d.temperature != 1.0 else 3)  # online sums of head rows + the gradient
        work = (4 if one else 5) * rows * width * 4 + slices + upcast + sums
        path = f"vocabulary-outer (torch_kd_online), {rows} rows x {width} vocabulary rows"
    else:
        rows = default_chunk_rows(n, max(hs, ht), vocab, n_heads=2, gpu=device == "cuda")
        work, path = TORCH_KD_CHUNK_BUFFERS[kind] * rows * vocab * 4, f"PyTorch row chunks of {rows}"
        work += _heap_retention(recipe, device, work, rows * vocab * 4)
    fwd = teacher_forward_bytes(t, elem=te, mbs=mbs, seq=seq, attn=recipe.model.attn_implementation)
    dm = DistillMemory(t.base_weight_bytes + t.lora_params * 4, fwd, outputs, math.ceil(work + grad_h), bwd, path)
    return dm if recipe.kernels == "off" else _weighted(recipe, dm, n * hs * elem)


def _weighted(recipe: Any, dm: DistillMemory, cast: int) -> DistillMemory:
    """Rows with loss weights other than 1 (a dataset's ``loss_weight``; per-row ``weight`` fields are not visible
    in the recipe) make the KD loss per token (``reduction="none"``): its forward computes no gradient and its
    backward runs the chunks again, with the teacher's outputs (or the cached top-k) kept for it."""
    if all(spec.loss_weight == 1.0 for spec in recipe.data.train):
        return dm
    return dataclasses.replace(dm, kd_loss_bwd=max(dm.kd_loss_bwd, dm.kd_loss_fwd + cast),
                               teacher_outputs_bwd=dm.teacher_outputs)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def distill_notes(recipe: Any, shape: ModelShape, teacher: Teacher | None, *, device: str, elem: int, mbs: int,
                  seq: int) -> list[str]:
    """The estimate's notes on distillation: which KD loss path the run takes and what the teacher is."""
    dm = distill_memory(recipe, shape, teacher, device=device, elem=elem, mbs=mbs, seq=seq)
    if dm is None:
        return []
    d = recipe.distill
    at_loss = (f"at the KD loss ({dm.path}): {_size(dm.kd_loss_fwd)} of working set + {_size(dm.teacher_outputs)} of "
               + ("cached top-k log-probs and ids" if teacher is None else "teacher hidden states"))
    if teacher is None:
        return [f"distill (offline, top_k {d.top_k}): the teacher is not loaded; {at_loss}"]
    t = teacher.shape
    quant = f", {t.quantized_params / 1e9:.2f} B parameters in 4 bits" if t.quantized_params else ""
    line = (f"distill (online, {d.kind}): teacher {teacher.label} ({t.n_layers} layers, hidden {t.hidden}, "
            f"{teacher.elem * 8}-bit compute{quant}): its forward peaks at {_size(dm.teacher_forward)} of transients, "
            f"before the student's; {at_loss}")
    return [line, *teacher.notes]
