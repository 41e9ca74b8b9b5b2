"""Long context on one card: checkpointed layer inputs offloaded to host memory, the MLP chunked over the sequence.

Under gradient checkpointing each decoder layer keeps only its input for backward (``tokens x hidden`` per
layer: 32 x 2 x 80k x 4096 = 21 GB at 80k tokens for Llama-3.1-8B in bf16, most of a 24 GB card). Two
per-instance changes, both opt-in recipe keys, take the remaining long-context costs off the device:

* ``train.offload_activations`` (:func:`apply_activation_offload`): each decoder layer's checkpoint function
  becomes :class:`OffloadedCheckpoint` — the layer runs without autograd in forward and its input is copied to a
  pinned host buffer on a side CUDA stream (the device copy is freed as soon as the copy is done); in backward the
  input comes back, the layer is recomputed with autograd and back-propagated (the reentrant checkpoint scheme),
  and the *previous* layer's input is already being copied back on the side stream (prefetched one layer ahead).
  On the CPU the host buffer is the input itself (nothing to move): the same recompute path runs, so the
  numerics are tested on any machine. The recompute is the largest thing on the card at long context, so it keeps
  less than autograd would (:class:`~peftlab.model.lean_recompute.LeanSaved`: dropout keep-masks as RNG states,
  norm outputs as the norm's input, a 16-bit RMSNorm's fp32 copy as its 16-bit input — each remade exactly in
  backward) and the recomputed output is freed before back-propagating through it (:func:`release_storage`).
* ``train.mlp_chunk_tokens`` (:func:`apply_mlp_chunking`): each decoder MLP instance runs over the sequence in
  chunks of N positions, each chunk under a non-reentrant checkpoint: the ``tokens x intermediate`` gate / up /
  product activations (3.5x the hidden width for Llama) exist for one chunk at a time, in forward and in backward.
  The MLP is position-wise, so the result and every gradient are those of the whole-sequence MLP.

Only the layer instances of the model peftlab built are changed (their ``_gradient_checkpointing_func`` and the
MLP's ``forward`` attributes); transformers' classes are untouched.
"""
from __future__ import annotations

import functools
import logging
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from peftlab.errors import PeftlabError
from peftlab.model.lean_recompute import LeanSaved, restored_rng, rng_state

logger = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's checkpointable decoder layers (transformers' ``GradientCheckpointingLayer`` instances)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


# ---- activation offload ----------------------------------------------------------------------------------------


class _Saved:
    """One checkpointed layer input: its host copy, and (in backward) its device copy coming back."""

    __slots__ = ("__weakref__", "device", "device_copy", "done", "dtype", "fetched", "host", "offloaded", "shape",
                 "slot")

    def __init__(self) -> None:
        self.slot = 0               # which pinned buffer of the pool holds it
        self.host: Tensor | None = None
        self.device_copy: Tensor | None = None
        self.offloaded: Any = None  # CUDA event: host copy complete
        self.fetched: Any = None    # CUDA event: device copy complete
        self.done = False


def _pinned_empty(nbytes: int) -> Tensor:
    """A pinned (page-locked) host buffer of ``nbytes`` bytes (a function of its own: the CUDA branch's tests on a
    machine without CUDA give plain host memory here)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _record_stream(t: Tensor, stream: Any) -> None:
    t.record_stream(stream)


def empty_host_cache() -> None:
    """Give the pinned host memory torch's caching host allocator keeps after its tensors are freed back to the OS.

    That allocator rounds every pinned buffer up to a power of two and never frees one on its own: a context search
    that grows the offloaded inputs 4k -> 8k -> ... -> 128k tokens would hold every size it passed (about 64 GiB for
    an 8B model) on top of the buffers in use. ``torch.accelerator.empty_host_cache`` (torch >= 2.12), else
    ``torch._C._host_emptyCache`` (torch 2.5-2.11); nothing without CUDA."""
    if not torch.cuda.is_available():
        return
    fn = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
        torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


class ActivationOffloader:
    """Host buffers of one model's checkpointed layer inputs, in forward order (shared by its layers).

    CUDA: pinned host buffers (kept and reused across steps, grown when a longer batch comes), copies on one side
    stream, ``record_stream`` so the caching allocator never reuses a tensor's memory while a copy still reads it.
    CPU: the input is already in host memory; it is kept as is.
    """

    def __init__(self) -> None:
        # inputs of the forward passes whose backward has not run yet, in forward order; weak: a graph dropped
        # without a backward (an exception, a forward that only measured something) frees its entries
        self._pending: list[weakref.ref[_Saved]] = []
        self.pool: list[Tensor] = []      # pinned buffers, one per slot
        self._stream: Any = None
        self.lean: LeanSaved | None = None  # what the recompute keeps less of (apply_activation_offload sets it)

    @staticmethod
    def uses_streams(device: torch.device) -> bool:
        """Whether inputs on ``device`` go to pinned host buffers through a side stream (CUDA) or stay as they are."""
        return device.type == "cuda"

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _pinned(self, slot: int, numel: int, dtype: torch.dtype) -> Tensor:
        while len(self.pool) <= slot:
            self.pool.append(_pinned_empty(0))
        nbytes = numel * dtype.itemsize
        if self.pool[slot].numel() < nbytes:
            # the caching host allocator pins a power of two anyway: asking for it lets a longer batch up to that size
            # reuse the buffer; the old one goes first, so its block can serve another slot's request
            self.pool[slot] = _pinned_empty(0)
            self.pool[slot] = _pinned_empty(1 << (nbytes - 1).bit_length())
        return self.pool[slot][:nbytes].view(dtype)

    def release_host_buffers(self) -> int:
        """Drop the pinned buffers no pending input uses (between steps of different lengths); returns their bytes.
        :func:`empty_host_cache` then gives them back to the OS."""
        used = {s.slot for s in self.pending}
        freed = 0
        for slot, buf in enumerate(self.pool):
            if slot not in used:
                freed += buf.numel()
                self.pool[slot] = _pinned_empty(0)
        return freed

    @property
    def pending(self) -> list[_Saved]:
        self._pending = [r for r in self._pending if r() is not None and not r().done]
        return [r() for r in self._pending]

    def offload(self, x: Tensor) -> _Saved:
        saved = _Saved()
        saved.shape, saved.dtype, saved.device = x.shape, x.dtype, x.device
        used = {s.slot for s in self.pending}
        saved.slot = next(i for i in range(len(used) + 1) if i not in used)
        if not self.uses_streams(x.device):
            saved.host = x.detach()
        else:
            stream = self._side_stream(x.device)
            host = self._pinned(saved.slot, x.numel(), x.dtype)
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is written on the compute stream
            with torch.cuda.stream(stream):
                host.copy_(x.detach().reshape(-1), non_blocking=True)
                saved.offloaded = torch.cuda.Event()
                saved.offloaded.record(stream)
            _record_stream(x, stream)  # its memory is not reused before the copy has read it
            saved.host = host
        self._pending.append(weakref.ref(saved))
        return saved

    def _start_fetch(self, saved: _Saved) -> None:
        if saved.device_copy is not None or saved.done:
            return
        if not self.uses_streams(saved.device):
            saved.device_copy = saved.host
            return
        stream = self._side_stream(saved.device)
        with torch.cuda.stream(stream):
            stream.wait_event(saved.offloaded)
            saved.device_copy = saved.host.to(saved.device, non_blocking=True).view(saved.shape)
            saved.fetched = torch.cuda.Event()
            saved.fetched.record(stream)

    def fetch(self, saved: _Saved) -> Tensor:
        """The layer input back on its device (waited for), with the previous layer's input prefetched."""
        self._start_fetch(saved)
        x = saved.device_copy
        if self.uses_streams(saved.device):
            current = torch.cuda.current_stream(saved.device)
            current.wait_event(saved.fetched)
            _record_stream(x, current)  # allocated on the side stream, used and freed on the compute stream
        pending = self.pending
        i = next((k for k, s in enumerate(pending) if s is saved), None)
        if i:
            self._start_fetch(pending[i - 1])  # the layer whose backward runs next
        return x

    def release(self, saved: _Saved) -> None:
        saved.done, saved.device_copy, saved.host = True, None, None


class _OffloadedLayer(torch.autograd.Function):
    """Forward: the layer without autograd, its input offloaded. Backward: input fetched, layer recomputed with
    autograd and back-propagated (LoRA gradients accumulate into ``.grad`` as in reentrant checkpointing)."""

    @staticmethod
    def forward(ctx, run: Callable[[Tensor], Any], offloader: ActivationOffloader, x: Tensor,
                _anchor: Tensor) -> Tensor:
        ctx.run, ctx.offloader, ctx.x_requires_grad = run, offloader, x.requires_grad
        ctx.rng = rng_state(x.device)
        with torch.no_grad():
            out = run(x)
        ctx.saved = offloader.offload(x)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x = ctx.offloader.fetch(ctx.saved).detach().requires_grad_(ctx.x_requires_grad)
        out = _recompute(ctx.run, x, ctx.rng, ctx.offloader.lean)
        ctx.offloader.release(ctx.saved)
        release_storage(out)
        torch.autograd.backward(out, grad_out)
        return None, None, x.grad if ctx.x_requires_grad else None, None


def _recompute(run: Callable[[Tensor], Any], x: Tensor, rng: tuple[Tensor, Tensor | None],
               lean: LeanSaved | None) -> Any:
    """The layer's forward with autograd from the forward's RNG state, under ``lean``'s hooks; again while a mask packed
    as an RNG state was not the layer's (:meth:`LeanSaved.verify_masks`: each retry keeps one more module's masks)."""
    while True:
        kept = dict(lean.kept) if lean is not None else {}
        with torch.enable_grad(), restored_rng(x.device, rng), LeanSaved.active(lean):
            out = run(x)
        if lean is None or lean.verify_masks():
            return out
        lean.kept, out = kept, None  # uncounted, and its graph freed before the next run (its masks are wrong)


def release_storage(out: Tensor) -> None:
    """Free the recomputed layer output's memory before back-propagating through it (tokens x hidden: 0.6 GiB at
    80k tokens of an 8B model): backward needs only its shape and graph, and its gradient is the ``grad_out``
    already there. Only when nothing can read it any more: a fresh tensor (no view, its own storage) made inside
    the recompute, that the op that made it did not save (the layer's last op is the residual add, which saves
    neither operand nor its result); nothing downstream of it exists in the recomputed graph."""
    node = out.grad_fn
    if node is None or out._base is not None or out.untyped_storage().nbytes() != out.numel() * out.itemsize:
        return
    ptr = out.untyped_storage().data_ptr()
    saved = [getattr(node, n, None) for n in dir(node) if n.startswith("_saved_")]
    try:
        saved += list(getattr(node, "saved_tensors", ()))  # a custom autograd Function's node
    except RuntimeError:
        pass
    if any(isinstance(v, Tensor) and v.untyped_storage().data_ptr() == ptr for v in saved):
        return
    out.untyped_storage().resize_(0)


class OffloadedCheckpoint:
    """A decoder layer's ``_gradient_checkpointing_func``: called by transformers as ``f(forward_partial, x)``."""

    def __init__(self, offloader: ActivationOffloader) -> None:
        self.offloader = offloader
        # makes the output require grad when the layer input does not (frozen embeddings), so that backward
        # reaches the LoRA weights inside the layer
        self.anchor = torch.zeros((), requires_grad=True)

    def __call__(self, run: Callable[..., Any], *args: Any) -> Any:
        if len(args) != 1 or not isinstance(args[0], Tensor):
            raise PeftlabError("train.offload_activations: this decoder layer takes more than the hidden states "
                               "positionally; set train.offload_activations: false for this model")
        tuple_out = []

        def hidden_states_of(x: Tensor) -> Tensor:  # older layers return (hidden_states, attentions...)
            out = run(x)
            if isinstance(out, tuple):
                tuple_out.append(len(out))
                return out[0]
            return out

        out = _OffloadedLayer.apply(hidden_states_of, self.offloader, args[0], self.anchor)
        return (out,) + (None,) * (tuple_out[0] - 1) if tuple_out else out


def offloaders(model: nn.Module) -> list[ActivationOffloader]:
    """The activation offloaders of ``model``'s decoder layers (one per :func:`apply_activation_offload`)."""
    found: dict[int, ActivationOffloader] = {}
    for layer in decoder_layers(model):
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if isinstance(fn, OffloadedCheckpoint):
            found[id(fn.offloader)] = fn.offloader
    return list(found.values())


def release_host_buffers(model: nn.Module) -> int:
    """Drop the idle pinned buffers of ``model``'s offloaded layer inputs and give the host allocator's cache back
    to the OS (before a batch of another length, or once training ends); returns the bytes dropped."""
    freed = sum(off.release_host_buffers() for off in offloaders(model))
    empty_host_cache()
    return freed


def apply_activation_offload(model: nn.Module) -> int:
    """Offload the checkpointed inputs of ``model``'s decoder layers (gradient checkpointing must be on);
    returns the number of layers changed."""
    layers = [m for m in decoder_layers(model) if getattr(m, "gradient_checkpointing", False)]
    if not layers:
        raise PeftlabError("train.offload_activations=true: the model has no gradient-checkpointed decoder "
                           "layers; set model.gradient_checkpointing: true (or train.offload_activations: false)")
    offloader = ActivationOffloader()
    offloader.lean = LeanSaved(layers)
    fn = OffloadedCheckpoint(offloader)
    for layer in layers:
        layer._gradient_checkpointing_func = fn
    logger.info("train.offload_activations: the checkpointed inputs of %d decoder layers go to host memory",
                len(layers))
    return len(layers)


# ---- MLP chunked over the sequence ------------------------------------------------------------------------------


def _chunked_mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    chunk = self._peftlab_mlp_chunk
    run = self._peftlab_mlp_forward
    if x.dim() < 2 or x.shape[-2] <= chunk:
        return run(x)
    parts = []
    for piece in x.split(chunk, dim=-2):
        if torch.is_grad_enabled():
            parts.append(checkpoint(run, piece, use_reentrant=False))
        else:
            parts.append(run(piece))
    return torch.cat(parts, dim=-2)


def apply_mlp_chunking(model: nn.Module, chunk_tokens: int) -> int:
    """Run each decoder layer's ``mlp`` in chunks of ``chunk_tokens`` sequence positions; returns the count."""
    done = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or hasattr(mlp, "_peftlab_mlp_chunk"):
            continue
        mlp._peftlab_mlp_forward = functools.partial(type(mlp).forward, mlp) if "forward" not in vars(mlp) \
            else mlp.forward
        mlp._peftlab_mlp_chunk = chunk_tokens
        mlp.forward = types.MethodType(_chunked_mlp_forward, mlp)
        done += 1
    if not done:
        raise PeftlabError("train.mlp_chunk_tokens: the model's decoder layers have no .mlp module; "
                           "remove train.mlp_chunk_tokens")
    logger.info("train.mlp_chunk_tokens=%d: the MLP of %d decoder layers runs in chunks", chunk_tokens, done)
    return done
