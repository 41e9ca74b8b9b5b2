"""What the recompute of an offloaded decoder layer keeps: less than autograd would (:class:`LeanSaved`).

``train.offload_activations`` (:mod:`peftlab.model.long_context`) recomputes each decoder layer in backward, and
that recompute is the largest thing on the card at long context. Under :class:`LeanSaved`'s ``saved_tensors_hooks``
it keeps three kinds of saved tensors as a way to remake them exactly when backward needs them (a dropout
keep-mask as the RNG state it was drawn from, an RMSNorm's output as the norm and its input, a 16-bit RMSNorm's
fp32 copy as its 16-bit input). The forward's RNG state (:func:`rng_state`, :func:`restored_rng`) is what both
the recompute and the mask redraw replay.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU generator's state and, on a CUDA device, that device's: what LoRA dropout draws from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def restored_rng(device: torch.device, state: tuple[Tensor, Tensor | None]) -> Iterator[None]:
    """The RNG state ``state`` inside (the forward's, during the recompute: LoRA dropout draws the same masks);
    the state as it was before, after."""
    before = rng_state(device)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    try:
        yield
    finally:
        torch.set_rng_state(before[0])
        if before[1] is not None:
            torch.cuda.set_rng_state(before[1], device)


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
            self.lora = (module, rng_state(x.device), x.shape)

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
    with restored_rng(device, rng):
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)
