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
  less than autograd would (:class:`LeanSaved`: dropout keep-masks as RNG states, norm outputs as the norm's input,
  a 16-bit RMSNorm's fp32 copy as its 16-bit input — each remade exactly in backward) and the recomputed output is
  freed before back-propagating through it (:func:`release_storage`).
* ``train.mlp_chunk_tokens`` (:func:`apply_mlp_chunking`): each decoder MLP instance runs over the sequence in
  chunks of N positions, each chunk under a non-reentrant checkpoint: the ``tokens x intermediate`` gate / up /
  product activations (3.5x the hidden width for Llama) exist for one chunk at a time, in forward and in backward.
  The MLP is position-wise, so the result and every gradient are those of the whole-sequence MLP.

Only the layer instances of the model peftlab built are changed (their ``_gradient_checkpointing_func`` and the
MLP's ``forward`` attributes); transformers' classes are untouched.
"""
from __future__ import annotations

import contextlib
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

    def _side_stream(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _pinned(self, slot: int, numel: int, dtype: torch.dtype) -> Tensor:
        while len(self.pool) <= slot:
            self.pool.append(torch.empty(0, dtype=torch.uint8, pin_memory=True))
        nbytes = numel * dtype.itemsize
        if self.pool[slot].numel() < nbytes:
            self.pool[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return self.pool[slot][:nbytes].view(dtype)

    @property
    def pending(self) -> list[_Saved]:
        self._pending = [r for r in self._pending if r() is not None and not r().done]
        return [r() for r in self._pending]

    def offload(self, x: Tensor) -> _Saved:
        saved = _Saved()
        saved.shape, saved.dtype, saved.device = x.shape, x.dtype, x.device
        used = {s.slot for s in self.pending}
        saved.slot = next(i for i in range(len(used) + 1) if i not in used)
        if x.device.type != "cuda":
            saved.host = x.detach()
        else:
            stream = self._side_stream(x.device)
            host = self._pinned(saved.slot, x.numel(), x.dtype)
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is written on the compute stream
            with torch.cuda.stream(stream):
                host.copy_(x.detach().reshape(-1), non_blocking=True)
                saved.offloaded = torch.cuda.Event()
                saved.offloaded.record(stream)
            x.record_stream(stream)  # its memory is not reused before the copy has read it
            saved.host = host
        self._pending.append(weakref.ref(saved))
        return saved

    def _start_fetch(self, saved: _Saved) -> None:
        if saved.device_copy is not None or saved.done:
            return
        if saved.device.type != "cuda":
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
        if saved.device.type == "cuda":
            current = torch.cuda.current_stream(saved.device)
            current.wait_event(saved.fetched)
            x.record_stream(current)  # allocated on the side stream, used and freed on the compute stream
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
        ctx.rng = _rng_state(x.device)
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
        with torch.enable_grad(), _restored_rng(x.device, rng), LeanSaved.active(lean):
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


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class _restored_rng:
    """The RNG state of the forward during the recompute (LoRA dropout draws the same masks); restored after."""

    def __init__(self, device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
        self.device, self.state = device, state

    def __enter__(self) -> None:
        self.before = _rng_state(self.device)
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.before[0])
        if self.before[1] is not None:
            torch.cuda.set_rng_state(self.before[1], self.device)


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


# ---- what the recompute keeps: less than autograd would -----------------------------------------------------------


class LeanSaved:
    """``saved_tensors_hooks`` for the recompute of an offloaded layer: three kinds of saved tensors are kept as a
    way to remake them, exactly, when backward needs them, instead of as tensors (the recomputed layer is what
    fills the card at long context, so each is tokens x width off the peak):

    * a LoRA dropout keep-mask (bool, one byte per input element of each adapted layer) → the RNG state it was
      drawn from: redrawn in backward (``fused_lora_linear`` draws it with ``bernoulli_`` as the layer's first use
      of the RNG), compared with the real mask on the device and read once per recompute (:meth:`verify_masks`: one
      host sync, not one per adapted layer); a mismatch keeps that module's masks and recomputes the layer;
    * an RMSNorm's output (the normed input that q/k/v — or, without MLP chunks, gate/up — keep) → the norm and its
      input, which stays alive anyway: recomputed in backward (the same op on the same input);
    * transformers' 16-bit RMSNorm's fp32 copy of its input (``x.to(float32)``, 4 bytes per element) → the
      16-bit input itself, upcast in backward (exact).

    Hooks on the layer's norm and LoRA modules (per instance) tell the pack hook which module is running; they do
    nothing outside the recompute."""

    def __init__(self, layers: list[nn.Module]) -> None:
        from peftlab.adapters.lora_layer import LoraLinear

        self.on = False
        # output storage -> (norm, its input, the output itself, weakly: a storage freed and reused is no match,
        # the output's version when made, the input's version when the norm read it)
        self.norm_outputs: dict[int, tuple[nn.Module, Tensor, weakref.ref[Tensor], int, int]] = {}
        self.norm_input: Tensor | None = None       # the input of the norm running now
        self.norm_input_version = 0                 # its version when the norm began
        self.lora: tuple[nn.Module, tuple[Tensor, Tensor | None], torch.Size] | None = None
        self.mask_checks: list[tuple[nn.Module, Tensor, int]] = []  # (module, differs: on the device, bytes)
        self.keep_masks: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # modules whose masks did not redraw
        self.mask_mismatch_logged = False
        # bytes kept as a way to remake them instead, each storage once (for tests and logs)
        self.kept: dict[str, int] = {"mask": 0, "norm_output": 0, "upcast": 0}
        self._counted: set[Any] = set()
        for layer in layers:
            for child in layer.modules():
                if type(child).__name__.endswith("RMSNorm"):
                    child.register_forward_pre_hook(self._norm_enter, with_kwargs=True)
                    child.register_forward_hook(self._norm_exit)
                elif isinstance(child, LoraLinear):
                    child.register_forward_pre_hook(self._lora_enter)
                    child.register_forward_hook(self._lora_exit)

    @staticmethod
    def active(lean: LeanSaved | None):
        """The hooks, for one recompute (a no-op context without ``lean``)."""
        return contextlib.nullcontext() if lean is None else lean._session()

    def _session(self):
        lean = self

        class _Session(torch.autograd.graph.saved_tensors_hooks):
            def __init__(self) -> None:
                super().__init__(lean._pack, lean._unpack)

            def __enter__(self) -> None:
                lean.on, lean.norm_outputs, lean._counted, lean.mask_checks = True, {}, set(), []
                super().__enter__()

            def __exit__(self, *exc: object) -> None:
                super().__exit__(*exc)
                lean.on, lean.norm_outputs, lean.norm_input, lean.lora, lean._counted = False, {}, None, None, set()

        return _Session()

    # module hooks
    def _norm_enter(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # only a call on the input alone: the recompute calls ``norm(x)``, which must be the same call
        if self.on and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            self.norm_input, self.norm_input_version = args[0], args[0]._version

    def _norm_exit(self, module: nn.Module, args: tuple, out: Any) -> None:
        # an output that fills its own storage from the start: a recompute lays its values out the same way
        if (self.on and isinstance(out, Tensor) and self.norm_input is not None and out.is_contiguous()
                and out.storage_offset() == 0 and out.untyped_storage().nbytes() == out.numel() * out.itemsize):
            self.norm_outputs[out.untyped_storage().data_ptr()] = (module, self.norm_input, weakref.ref(out),
                                                                   out._version, self.norm_input_version)
        self.norm_input = None

    def _lora_enter(self, module: nn.Module, args: tuple) -> None:
        drop = getattr(module, "lora_dropout", None)
        if not (self.on and module.training and isinstance(drop, nn.Dropout) and drop.p > 0 and args):
            return
        # fused_lora_linear draws a bool mask; the PyTorch path's nn.Dropout keeps its own mask, which is left alone
        x = args[0]
        if module.uses_fused_kernel(x) and module not in self.keep_masks:
            self.lora = (module, _rng_state(x.device), x.shape)

    def _lora_exit(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.lora = None

    # saved-tensor hooks
    def _pack(self, t: Tensor) -> Any:
        if not self.on:
            return t
        if t.dtype == torch.bool and self.lora is not None:
            return self._pack_mask(t)
        hit = self.norm_outputs.get(t.untyped_storage().data_ptr())
        # the output itself or a view of it, not changed in place since the norm made it (in-place RoPE on a
        # normed q would be), nor its input since the norm read it (a recompute from a changed input would give
        # other values, and the gradient would be wrong without an error): a recompute gives exactly the saved values
        if (hit is not None and hit[2]() is not None and t.dtype == hit[2]().dtype and t._version == hit[3]
                and hit[1]._version == hit[4]):
            self._count("norm_output", id(hit), t)
            return ("norm", hit[0], hit[1], hit[4], t.shape, t.stride(), t.storage_offset())
        x = self.norm_input
        if (x is not None and t.dtype == torch.float32 and x.dtype != torch.float32 and t.shape == x.shape
                and x._version == self.norm_input_version and _is_cast_of(t, x)):
            self._count("upcast", ("upcast", id(x)), t)
            return ("upcast", x, self.norm_input_version)
        return t

    def _count(self, kind: str, key: Any, t: Tensor) -> None:
        """Each tensor once though several ops save it (q/k/v's input; the fp32 copy for pow and mul): ``key`` is
        the norm call that made it (a storage address is no key: a freed one is reused at once)."""
        if key not in self._counted:
            self._counted.add(key)
            self.kept[kind] += t.untyped_storage().nbytes()

    def _pack_mask(self, t: Tensor) -> Any:
        module, rng, shape = self.lora
        if t.numel() != shape.numel() or t.shape[-1] != shape[-1]:
            return t
        p = float(module.lora_dropout.p)
        # compared on the device without waiting for the answer (verify_masks reads all of them at once)
        differs = _redraw(t.device, rng, shape, p).reshape(t.shape).ne_(t).any()
        self.mask_checks.append((module, differs, t.untyped_storage().nbytes()))  # one tensor per layer call
        return ("mask", t.device, rng, shape, p, t.shape)

    def verify_masks(self) -> bool:
        """Whether every mask this recompute packed as an RNG state is the one the layer drew (one host sync). False:
        the modules that drew the others keep their masks from now on; recompute (that graph has wrong masks)."""
        checks, self.mask_checks = self.mask_checks, []
        if not checks:
            return True
        if not bool(torch.stack([differs for _, differs, _ in checks]).any()):  # the one sync
            self.kept["mask"] += sum(nbytes for *_, nbytes in checks)
            return True
        self.keep_masks.update(module for module, differs, _ in checks if bool(differs))
        if not self.mask_mismatch_logged:
            logger.warning("train.offload_activations: a LoRA dropout mask could not be redrawn from its RNG state; "
                           "that layer's masks stay in memory (correct, more memory)")
            self.mask_mismatch_logged = True
        return False

    def _unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        kind = packed[0]
        if kind == "mask":
            _, device, rng, shape, p, view = packed
            return _redraw(device, rng, shape, p).reshape(view)
        if kind == "upcast":
            _check_unchanged(packed[1], packed[2])
            return packed[1].float()
        _, norm, x, version, shape, stride, offset = packed
        _check_unchanged(x, version)
        was, self.on = self.on, False  # the norm's own hooks stay quiet
        try:
            with torch.no_grad():
                y = norm(x)
        finally:
            self.on = was
        return y.as_strided(shape, stride, offset)


def _check_unchanged(x: Tensor, version: int) -> None:
    if x._version != version:  # what autograd does for a saved tensor changed in place: never a silent wrong gradient
        raise RuntimeError("train.offload_activations: a norm input kept to remake a saved tensor was changed in "
                           "place before backward; set train.offload_activations: false for this model")


def _is_cast_of(t: Tensor, x: Tensor) -> bool:
    """``t`` is ``x.to(float32)``: made by a dtype copy whose input is ``x`` itself."""
    node = t.grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0" or not node.next_functions:
        return False
    src, output_nr = node.next_functions[0]
    if x.grad_fn is not None:  # the same node AND the same of its outputs (two chunks of one split share a node)
        return src is x.grad_fn and output_nr == x.output_nr
    return src is not None and getattr(src, "variable", None) is x


def _redraw(device: torch.device, rng: tuple[Tensor, Tensor | None], shape: torch.Size, p: float) -> Tensor:
    """The keep-mask ``fused_lora_linear`` drew from RNG state ``rng`` (its ``resolve_dropout_mask``)."""
    with _restored_rng(device, rng):
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


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
