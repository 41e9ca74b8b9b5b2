"""The memory planner behind ``peftlab estimate``: predicted peak memory of a run, by component.

Everything comes from the model's config: weight and adapter sizes are counted on a meta-device model
and activations follow what autograd keeps per decoder layer in a QLoRA step
(:mod:`peftlab.engine.model_shape`); the peak is the larger of the end of the forward pass (every layer's
saved tensors and the loss head's buffers) and the start of the backward pass (its temporaries).
What a run does with the figures — ``train.auto_fit``, the advice after running out of memory — is
:mod:`peftlab.engine.memory_fit`; a ``distill:`` recipe's teacher and KD loss are :mod:`peftlab.engine.planner_distill`;
the report ``peftlab estimate`` prints is :mod:`peftlab.engine.estimate_report`.

On a GPU "device memory" is what the CUDA allocator holds plus the CUDA context; on the CPU it is the
process's peak resident set (:func:`peak_rss_bytes`), which also holds the Python + torch + transformers +
bitsandbytes baseline — measured once per environment in a fresh interpreter that imports what
``peftlab train`` imports (cached under the peftlab cache), not a constant from another machine.
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from typing import Any

import torch

from peftlab.checkpoint.atomic import atomic_write_text
from peftlab.engine.estimate_report import Estimate, MiB, fmt
from peftlab.engine.loss_head import ce_loss_head
from peftlab.engine.model_shape import ModelShape, kernels_run_triton, layer_activations, model_shape
from peftlab.engine.planner_distill import Teacher, distill_memory, distill_notes, teacher_shape
from peftlab.errors import PeftlabError
from peftlab.kernels.nf4 import kernel_path

CUDA_CONTEXT_BYTES = 500 * MiB  # CUDA context + cuBLAS workspace outside the caching allocator (typ. 0.3-0.6 GiB)
# Host-side working set of a CPU run beyond the live tensors the components count.
# - train.host_allocator: bounded (peftlab/engine/hostmem.py): every tensor >= 1 MiB is its own mapping and
#   goes back to the OS when freed; what remains is heap kept for small tensors and page rounding:
#   a small fraction of what the step allocates.
# - default (glibc's adaptive threshold): the heap keeps freed activation blocks, fragmented by the
#   tensors that stay alive. Measured (bench/bench_estimate.py, bench/scale.py: default minus bounded
#   peak of the same run) it holds CPU_HEAP_RETENTION x (hidden + intermediate) activations of every
#   layer for every token, with or without gradient checkpointing, where the factor was 3.6-5.2 across
#   a 100M Llama fp32 (1k-4k tokens), Llama-3.2-1B and Llama-3.1-8B bf16: an empirical figure fitted
#   to those runs (4.5: within ±15% of each), not a derivation. bounded needs no such term.
# - auto (the default: huge pages for tensors >= 2 MiB, the heap's free pages handed back after every
#   micro-batch's backward) keeps what one micro-batch fragments: fitted the same way to the ~40M Llama of
#   tests/engine/test_planner.py (with and without checkpointing: 4.0 and 3.2) and bench/vs_peers.py's 155M
#   model (3.1): 3.5.
CPU_ALLOCATOR_SLACK = 0.05
CPU_HEAP_RETENTION = 4.5
CPU_HEAP_RETENTION_AUTO = 3.5
EAGER_NORM_BACKWARD_BYTES = 20  # per element: transformers' 16-bit RMSNorm backward (fp32 math), measured


def peak_rss_bytes() -> int:
    """This process's own peak resident set: ``VmHWM`` of /proc/self/status.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux execve carries the high-water mark of the
    forked copy of the parent over into the child's ``ru_maxrss``, so a child started by a 1.5 GB
    process reports >= 1.5 GB whatever it used itself (measured). Falls back to ``ru_maxrss`` where
    /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}


def optimizer_state_bytes(optimizer: str, elem: int) -> int:
    """Optimizer state per trainable parameter stored in ``elem`` bytes (an ``adapter.unfreeze`` module, in the
    model's dtype): torch's AdamW keeps its two moments in the parameter's dtype, bitsandbytes' 32-bit ones in fp32,
    its 8-bit ones in one byte each."""
    return 2 * elem if optimizer == "adamw" else OPTIMIZER_BYTES_PER_PARAM[optimizer]


PROBE = r"""
import json, os, sys
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import psutil, torch
from peftlab.engine.hostmem import prepare_host_allocator
from peftlab.engine.local import LocalEngine
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss
from peftlab.model.load import build_model
from peftlab.recipe.parse import recipe_from_dict
import peftlab.trainer.loop, peftlab.data, peftlab.evaluation.evaluate, peftlab.metrics.runlog
mods = json.loads(sys.argv[1])
for m in mods:
    __import__(m)
raw = json.loads(sys.argv[2])
recipe = recipe_from_dict(raw)
prepare_host_allocator(recipe.train.host_allocator)  # as a CPU run does before it loads its model
loaded = build_model(recipe)
engine = LocalEngine(loaded.model, recipe.train, 2, loaded.device)
ids = torch.randint(0, 200, (2, 16))
mask = torch.ones_like(ids); mask[1, 12:] = 0
batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
loaded.model.train()
causal_lm_loss(loaded.model, batch, normalizer=30.0, settings=LossSettings.from_recipe(recipe)).backward()
engine.step()
print(psutil.Process().memory_info().rss)
"""


BASELINE_CACHE_ENTRIES = 64  # probe figures kept in estimate_baseline.json, newest last


def _probe_baseline(recipe: Any) -> int:
    """Resident set of a fresh interpreter that has done what every ``peftlab train`` does before the
    model-size-dependent part: imported torch/transformers/bitsandbytes/peftlab (+ TensorBoard and
    matplotlib when the recipe reports to them), loaded the recipe's tokenizer, built the built-in
    micro model with the recipe's quantisation and LoRA and run one training step on it (so autograd's
    and the math libraries' one-time buffers are in). Cached per environment and recipe shape."""
    from peftlab.model.builtin import cache_root

    mods = ["tqdm.auto"]
    if "tensorboard" in recipe.output.report_to:
        # what RunLog's EventFile imports (it writes the event file itself, not through torch's SummaryWriter)
        mods += ["tensorboard.compat.proto.event_pb2", "tensorboard.compat.proto.summary_pb2",
                 "tensorboard.summary.writer.record_writer"]
    if recipe.output.plot:
        mods += ["matplotlib", "matplotlib.pyplot"]
    raw = {"model": {"name": "builtin:micro-llama", "dtype": recipe.model.dtype,
                     "tokenizer": recipe.model.tokenizer or recipe.model.name,
                     "attn_implementation": recipe.model.attn_implementation,
                     "gradient_checkpointing": recipe.model.gradient_checkpointing},
           "quantization": recipe.quantization.model_dump(), "adapter": {"r": 4, "dropout": recipe.adapter.dropout},
           "data": {"train": [{"path": "unused.jsonl"}]}, "kernels": recipe.kernels,
           "train": {"device": "cpu", "optimizer": "adamw", "host_allocator": recipe.train.host_allocator}}
    # the probe's own text is part of the key: a changed probe measures again instead of reusing old figures
    probe = hashlib.sha256(PROBE.encode()).hexdigest()[:16]
    key = json.dumps([sys.executable, torch.__version__, mods, raw, probe], sort_keys=True)
    cache = cache_root() / "estimate_baseline.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return int(known[key])
    out = subprocess.run([sys.executable, "-P", "-c", PROBE, json.dumps(mods), json.dumps(raw)],
                         capture_output=True, text=True, check=False, timeout=600)
    if out.returncode != 0:
        raise PeftlabError("could not measure the process baseline (a one-step run of builtin:micro-llama "
                           f"failed): {out.stderr.strip()[-800:]}")
    rss = int(out.stdout.strip().splitlines()[-1])
    known[key] = rss
    for old in list(known)[:-BASELINE_CACHE_ENTRIES]:  # the oldest go (each fresh tokenizer path adds a key)
        del known[old]
    try:  # a cache: losing it costs one more probe, so no fsync; atomic so that racing runs never read half
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(known), fsync=False)
    except OSError:
        pass
    return rss


def run_device(recipe: Any) -> str:
    """``cuda`` or ``cpu``: where the recipe's run trains (``train.device: auto`` takes a GPU when there is one)."""
    t = recipe.train.device
    return "cuda" if t == "cuda" or (t == "auto" and torch.cuda.is_available()) else "cpu"


def compute_dtype(recipe: Any, device: str) -> torch.dtype:
    """The dtype the run computes in on ``device`` (``model.dtype: auto``: bfloat16 on a GPU, float32 on the CPU)."""
    from peftlab.model.load import DTYPES

    if recipe.model.dtype != "auto":
        return DTYPES[recipe.model.dtype]
    return torch.bfloat16 if device == "cuda" else torch.float32


def grad_accum_keeping_batch(micro_batch_size: int, grad_accum: int, new_micro_batch_size: int) -> int:
    """The grad_accum that keeps ``micro_batch_size`` x ``grad_accum`` examples per step (at least) with
    ``new_micro_batch_size``: what ``train.auto_fit`` sets when it lowers the micro-batch."""
    return max(1, math.ceil(micro_batch_size * grad_accum / new_micro_batch_size))


def fused_norm_saves(recipe: Any, device: str) -> bool:
    """Whether ``train.fused_norm: true`` would lower the recipe's peak on ``device``: it is off now, the run's
    kernels run their Triton code (elsewhere — the CPU, or CUDA without Triton installed — the fused norm runs
    transformers' own ops: :func:`~peftlab.engine.model_shape.kernels_run_triton`) and it computes in 16 bits —
    transformers' RMSNorm keeps an fp32 copy of a 16-bit input and runs its backward in fp32; in fp32 there is no
    copy to save."""
    return (not recipe.train.fused_norm and kernels_run_triton(recipe.kernels, device)
            and compute_dtype(recipe, device).itemsize < 4)


def _components(recipe: Any, shape: ModelShape, *, device: str, elem: int, mbs: int, seq: int,
                baseline: int, teacher: Teacher | None = None, grad_accum: int | None = None) -> dict[str, int]:
    """The predicted peak, by component. The peak is the largest of three moments of a step:

    - the end of the forward pass: what every layer keeps (under gradient checkpointing its input; with
      ``train.offload_activations`` only the inputs in flight), the final norm's and embeddings' outputs,
      RoPE's cos/sin, and the loss head's buffers (the whole fp32 logits, log-softmax and their gradient when
      ``kernels: off``; one chunk + the fp32 hidden-state gradient with the fused loss);
    - the loss head's backward: its gradient buffers (fused: the fp32 hidden-state gradient, its scaled copy
      and the compute-dtype result);
    - a decoder layer's backward: under gradient checkpointing the layer recomputed (everything
      :func:`layer_activations` says it keeps; the MLP's gate/up activations for one chunk with
      ``train.mlp_chunk_tokens``), the residual stream's gradient (compute dtype: the loss head's fp32 buffers
      are freed by then), and the backward temporaries: one dequantised base weight (compute dtype) and the
      larger of ~4 hidden-width gradients (transformers' 16-bit RMSNorm: its fp32 backward, measured) and the
      attention backward's (q/k/v-sized gradients, GQA expanded to all heads, + flash's fp32 dq accumulator),
      the attention mask in the compute dtype.

    ``activations`` is what the layers keep at the peak moment, ``loss_head`` the loss head's share (at a
    layer's backward: the residual stream's gradient), ``temporary_buffers`` the rest. With ``distill:``
    (:mod:`peftlab.engine.planner_distill`) the KD loss (``kd_loss``) replaces the loss head's buffers, what it
    reads of the teacher (``teacher_outputs``) is alive at the loss, the teacher's weights (``teacher_weights``)
    throughout, and the teacher's forward (``teacher_forward``) is a fourth moment, before the student's.

    ``gradients`` is what the trainable parameters' ``.grad`` hold at the peak moment (the LoRA weights' fp32,
    an ``adapter.unfreeze`` module's in the model's dtype). The optimizer sets them to None after every step
    (``zero_grad(set_to_none=True)``), so with ``grad_accum`` 1 (the recipe's unless given: ``train.auto_fit``
    raises it when it lowers the micro-batch) none exists during the forward pass and the loss — but the ones the
    loss makes itself (a trained head: :func:`~peftlab.engine.loss_head.head_gradient_bytes` counts that share
    here) — and during the backward those of the layers already done (counted whole: the peak layer is the last
    one); from a step's second micro-batch on all are alive throughout (measured: tests/engine/
    test_planner_terms.py). DeepSpeed keeps its gradient buffers for the whole run."""
    t = recipe.train
    n_tokens = mbs * seq
    H = shape.hidden
    lora_bytes = shape.lora_params * 4  # adapters train in fp32 whatever the base dtype
    attn = recipe.model.attn_implementation
    # train.fused_blocks: the block Functions run on any device, their GEMMs in torch where Triton does not run,
    # keeping the same tensors (measured: tests/engine/test_planner_terms.py) — but on the CPU bitsandbytes repacks a
    # 4-bit weight for its CPU kernel after an eval forward (AVX512-BF16 CPUs), which sends the calls to the
    # per-module path: a 4-bit CPU run is counted that way, the larger. Per-module LoRA layers and the fused norm
    # keep what the kernels keep only where the Triton code runs.
    fused_blocks = (bool(t.fused_blocks) and recipe.adapter.dropout == 0 and recipe.kernels != "off"
                    and not (device == "cpu" and recipe.quantization.mode != "none"))
    triton = kernels_run_triton(recipe.kernels, device)
    kernel = triton or fused_blocks
    fused_norm = bool(t.fused_norm) and triton
    # CPU SDPA with peftlab's boolean padding / packing mask takes torch's flash kernel (torch >= 2.3;
    # checked with torch._fused_sdp_choice): like CUDA SDPA it keeps no attention probabilities
    # train.mlp_chunk_tokens: the MLP's own activations (la.mlp per token) exist for one chunk of positions at a
    # time (each chunk is recomputed in backward); its input is kept whole by the chunk checkpoints
    mlp_tokens = n_tokens
    if t.mlp_chunk_tokens and t.mlp_chunk_tokens < seq:
        mlp_tokens = mbs * t.mlp_chunk_tokens
    # train.offload_activations recomputes each layer keeping less (lean_recompute.LeanSaved), on any device
    lean = bool(t.offload_activations and recipe.model.gradient_checkpointing)
    la = layer_activations(shape, elem=elem, seq_len=seq, attn=attn, dropout=recipe.adapter.dropout,
                           kernel=kernel, fused_norm=fused_norm, fused_blocks=fused_blocks, device=device,
                           sdpa_mask=True,  # peftlab's batches carry a mask (see `mask` below)
                           lean=lean, mlp_chunked=mlp_tokens < n_tokens)
    whole = (la.layer_input + la.attention) * n_tokens
    if mlp_tokens < n_tokens:
        whole += la.mlp_input * n_tokens
    # the 4D mask of a batch (bool for sdpa, fp32 for eager) lives for the whole step; SDPA converts a
    # boolean mask to the compute dtype on every call (a transient of the same shape)
    mask = 0 if attn == "flash_attention_2" else mbs * seq * seq * (1 if attn == "sdpa" else 4)
    mask_transient = 0 if attn == "flash_attention_2" else mbs * seq * seq * elem
    rope = 2 * n_tokens * shape.head_dim * elem  # cos / sin, shared by every layer
    if recipe.model.gradient_checkpointing:
        kept = shape.n_layers * n_tokens * H * elem  # each layer keeps only its input
        if offloaded_layers(recipe, device, shape):  # in host memory but the one being copied and the one prefetched
            kept = min(2, shape.n_layers) * n_tokens * H * elem
        recompute = whole - la.layer_input * n_tokens + la.mlp * mlp_tokens  # its input is among the kept
    else:
        kept = shape.n_layers * (whole + (la.mlp * n_tokens if mlp_tokens == n_tokens else 0))
        recompute = la.mlp * mlp_tokens if mlp_tokens < n_tokens else 0  # one MLP chunk, recomputed in backward
    kept += mask + rope
    # final norm input + output, embeddings output (kept by layer 0's norm is already counted): forward only
    head_inputs = 2 * n_tokens * H * elem
    widest = max(shape.intermediate, H)
    hidden_grads = 4 * n_tokens * H * elem
    if elem < 4 and not fused_norm:
        # transformers' RMSNorm backward in 16 bits runs in fp32: 20 bytes per element beyond its saved fp32 copy
        # and incoming gradient at its peak, its result included (CPU, torch 2.13: the memory timeline of
        # torch.profiler over one bf16 LlamaRMSNorm backward), + the incoming gradient
        hidden_grads = n_tokens * H * (EAGER_NORM_BACKWARD_BYTES + elem)
        if lean:  # its fp32 copy was kept as the 16-bit input: the backward makes it again
            hidden_grads += n_tokens * H * 4
    if mlp_tokens == n_tokens:
        hidden_grads = max(hidden_grads, 4 * n_tokens * widest * elem)
    else:  # the MLP-width gradients of one chunk
        hidden_grads = max(hidden_grads, 4 * mlp_tokens * widest * elem)
    if attn != "eager":  # dq, dk, dv expanded to every head, flash's fp32 dq accumulator, the output's gradient
        q_w, kv_w = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
        hidden_grads = max(hidden_grads, n_tokens * (q_w * (4 + 4 * elem) + 2 * kv_w * elem))
    # one base weight dequantised in the compute dtype at a time (fused_lora_linear, bitsandbytes); DoRA's weight
    # norm also takes an fp32 copy
    dequant = shape.largest_linear * (elem + (4 if recipe.adapter.dora else 0))
    backward_temps = dequant + hidden_grads + mask_transient
    grad_stream = n_tokens * H * elem
    loss_fwd, loss_bwd, _ = ce_loss_head(recipe, shape, device=device, elem=elem, n_tokens=n_tokens)
    unfrozen_bytes = shape.unfrozen_params * elem  # adapter.unfreeze: trained in the model's dtype
    grads = lora_bytes + unfrozen_bytes
    accumulating = (grad_accum or t.grad_accum) > 1 or bool(recipe.deepspeed)
    # grad_accum 1: no .grad before the loss but a trained head's, which the loss makes (its share of unfrozen_bytes)
    grads_fwd = grads if accumulating else (shape.vocab * shape.hidden * elem if shape.head_trainable else 0)
    moments = [
        {"activations": kept + head_inputs, "loss_head": loss_fwd, "temporary_buffers": mask_transient,
         "gradients": grads_fwd},
        {"activations": kept + head_inputs, "loss_head": loss_bwd, "temporary_buffers": 0, "gradients": grads_fwd},
        {"activations": kept, "loss_head": grad_stream, "temporary_buffers": recompute + backward_temps,
         "gradients": grads},
    ]
    dm = distill_memory(recipe, shape, teacher, device=device, elem=elem, mbs=mbs, seq=seq)
    if dm is not None:  # the KD loss in place of the loss head's buffers; the teacher's forward comes first
        moments[0].update(loss_head=0, kd_loss=dm.kd_loss_fwd, teacher_outputs=dm.teacher_outputs)
        moments[1].update(loss_head=0, kd_loss=dm.kd_loss_bwd, teacher_outputs=dm.teacher_outputs_bwd)
        moments.append({"activations": 0, "loss_head": 0, "temporary_buffers": 0,
                        "teacher_forward": dm.teacher_forward, "gradients": grads if accumulating else 0})
    if device == "cpu" and unfrozen_bytes:  # foreach AdamW's step: one intermediate per unfrozen parameter (torch.
        # profiler, CPU: a head's step peaks at its moments + one head-sized tensor), after the backward freed the rest
        moments.append({"activations": 0, "loss_head": 0, "temporary_buffers": unfrozen_bytes, "gradients": grads})
    peak = max(moments, key=lambda m: sum(m.values()))
    temporary = peak["temporary_buffers"]
    optimizer = (shape.lora_params * OPTIMIZER_BYTES_PER_PARAM[t.optimizer]
                 + shape.unfrozen_params * optimizer_state_bytes(t.optimizer, elem))
    if device == "cpu":
        # torch's foreach AdamW step allocates param-sized intermediates (after backward: never at the
        # same time as the activations, but the adapters are small) - counted on top, conservatively
        temporary += 2 * lora_bytes
    comps = {
        "baseline": baseline,
        "base_weights": shape.base_weight_bytes,
        "adapters": lora_bytes,
        "gradients": peak["gradients"],
        "optimizer_state": optimizer,
        "activations": peak["activations"],
        "loss_head": peak["loss_head"],
        "temporary_buffers": temporary,
    }
    if dm is not None:
        comps.update({"teacher_weights": dm.teacher_weights, "teacher_forward": peak.get("teacher_forward", 0),
                      "teacher_outputs": peak.get("teacher_outputs", 0), "kd_loss": peak.get("kd_loss", 0)})
    if device == "cpu":
        if t.host_allocator == "bounded":
            work = sum(v for k, v in comps.items() if k not in ("baseline", "base_weights", "teacher_weights"))
            comps["allocator_overhead"] = int(CPU_ALLOCATOR_SLACK * work)
        else:
            factor = CPU_HEAP_RETENTION_AUTO if t.host_allocator == "auto" else CPU_HEAP_RETENTION
            comps["allocator_overhead"] = int(factor * n_tokens * shape.n_layers
                                              * (shape.hidden + shape.intermediate) * elem)
    return {k: int(v) for k, v in comps.items()}


def offloaded_layers(recipe: Any, device: str, shape: ModelShape) -> int:
    """Decoder layers whose checkpointed input ``train.offload_activations`` keeps in host memory instead of on
    the GPU (0 on the CPU, where the input already is in host memory)."""
    if device != "cuda" or not recipe.train.offload_activations or not recipe.model.gradient_checkpointing:
        return 0
    return max(shape.n_layers - 2, 0)


def _zero_table(comps: dict[str, int], gpus: int) -> dict[str, int]:
    """Per-rank totals under each ZeRO stage (and offload) for ``gpus`` data-parallel ranks.

    Stage 1 shards optimizer state, 2 also gradients, 3 also parameters (the 4-bit base included,
    which needs quant_storage = the compute dtype). Offload moves optimizer state (and under stage 3
    parameters) to host memory. Not counted: ZeRO-3's gathered layer and DeepSpeed's bucket buffers.
    """
    c = comps
    g = max(gpus, 1)
    w, a, gr, o = c["base_weights"], c["adapters"], c["gradients"], c["optimizer_state"]
    fixed = sum(c.values()) - (w + a + gr + o)  # a distillation teacher is not sharded either
    return {
        "no_zero": fixed + w + a + gr + o,
        "zero1": fixed + w + a + gr + o // g,
        "zero2": fixed + w + a + (gr + o) // g,
        "zero3": fixed + (w + a + gr + o) // g,
        "zero2_offload_optimizer": fixed + w + a + gr // g,
        "zero3_offload_params_optimizer": fixed + gr // g,
    }


def estimate(recipe: Any, *, device_memory: int | None = None, gpus: int = 1, device: str | None = None,
             baseline: int | None = None, micro_batch_size: int | None = None,
             seq_len: int | None = None, shape: ModelShape | None = None) -> Estimate:
    """Predicted peak memory of the recipe's run on one rank (see the module docstring)."""
    device = device or run_device(recipe)
    dtype = compute_dtype(recipe, device)
    elem = dtype.itemsize
    shape = shape or model_shape(recipe, dtype, device=device)
    if baseline is None:
        baseline = _probe_baseline(recipe) if device == "cpu" else CUDA_CONTEXT_BYTES
    mbs = micro_batch_size or recipe.train.micro_batch_size
    seq = seq_len or recipe.data.max_seq_len
    teacher = teacher_shape(recipe, device)  # counted once: every _components call below reuses it
    comps = _components(recipe, shape, device=device, elem=elem, mbs=mbs, seq=seq, baseline=baseline, teacher=teacher)
    est = Estimate(comps, device, mbs, seq, device_memory, _zero_table(comps, gpus))
    est.notes += distill_notes(recipe, shape, teacher, device=device, elem=elem, mbs=mbs, seq=seq)
    if device == "cpu" and recipe.train.optimizer != "adamw":
        est.notes.append(f"train.optimizer={recipe.train.optimizer} needs CUDA; on the CPU use adamw")
    if offloaded_layers(recipe, device, shape):
        host = offloaded_layers(recipe, device, shape) * mbs * seq * shape.hidden * elem
        est.notes.append(f"train.offload_activations: {fmt(host)} of checkpointed layer inputs in pinned host memory "
                         "(not counted above)")
    if kernel_path(recipe.kernels, device) and not kernels_run_triton(recipe.kernels, device):
        est.notes.append("kernels: auto without Triton installed: the fused kernels and losses run their PyTorch "
                         "references, counted as such (install triton for the kernels' smaller working set)")
    if fused_norm_saves(recipe, device):
        fused = recipe.model_copy(deep=True)
        fused.train.fused_norm = True
        peak = sum(_components(fused, shape, device=device, elem=elem, mbs=mbs, seq=seq, baseline=baseline,
                               teacher=teacher).values())
        est.notes.append(f"train.fused_norm: true predicts {fmt(peak)}: transformers' RMSNorm keeps an fp32 copy of "
                         "its input and runs its backward in fp32, the fused one neither")
    if shape.unfrozen_params:
        est.notes.append(f"adapter.unfreeze: {shape.unfrozen_params / 1e6:.1f} M base parameters train in full; their "
                         "gradients and optimizer state are counted above" + (
                             " (the head's gradient is made by the loss, in fp32)" if shape.head_trainable else ""))
    if recipe.train.optimizer.startswith("paged"):
        est.notes.append("paged optimizer state can be evicted to host memory under pressure: "
                         f"{fmt(comps['optimizer_state'])} of the total is pageable")
    if device_memory is not None:
        def total(m: int, s: int, accum: int | None = None) -> int:
            return sum(_components(recipe, shape, device=device, elem=elem, mbs=m, seq=s, baseline=baseline,
                                   teacher=teacher, grad_accum=accum).values())

        est.max_seq_len = _largest(lambda s: total(mbs, s) <= device_memory, 1, _max_positions(recipe, shape))
        est.max_micro_batch_size = _largest(
            lambda m: total(m, seq, grad_accum_keeping_batch(mbs, recipe.train.grad_accum, m)) <= device_memory,
            1, 4096)
    return est


MAX_CONTEXT_SEARCHED = 1 << 20


def max_context(recipe: Any, device_memory: int, *, device: str | None = None, baseline: int | None = None,
                shape: ModelShape | None = None, micro_batch_size: int = 1) -> int | None:
    """The longest sequence (tokens per row, ``micro_batch_size`` rows) whose predicted peak fits ``device_memory``
    (binary search with the planner up to MAX_CONTEXT_SEARCHED); None when not even one token fits."""
    device = device or run_device(recipe)
    dtype = compute_dtype(recipe, device)
    shape = shape or model_shape(recipe, dtype, device=device)
    if baseline is None:
        baseline = _probe_baseline(recipe) if device == "cpu" else CUDA_CONTEXT_BYTES
    teacher = teacher_shape(recipe, device)

    def fits(s: int) -> bool:
        comps = _components(recipe, shape, device=device, elem=dtype.itemsize, mbs=micro_batch_size, seq=s,
                            baseline=baseline, teacher=teacher)
        return sum(comps.values()) <= device_memory

    return _largest(fits, 1, MAX_CONTEXT_SEARCHED)


def _max_positions(recipe: Any, shape: ModelShape) -> int:
    """The longest sequence the "largest seq_len" line searches: the model's own positions (131,072 when its config
    does not say), or the recipe's max_seq_len when that is longer."""
    return max(recipe.data.max_seq_len, shape.max_positions or 131072)


def _largest(ok, lo: int, hi: int) -> int | None:
    """Largest n in [lo, hi] with ok(n) (ok is monotone), None when even lo does not fit."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo
