"""The LoRA layer: a frozen linear base (dense, or bitsandbytes 4-bit/8-bit) plus a low-rank update.

Forward math is PEFT's ``lora.Linear`` / ``lora.Linear4bit`` for one adapter (plain LoRA, rsLoRA
scaling, DoRA), so logits agree with PEFT to fp32 rounding. On CUDA (or when asked) the layer hands
the whole ``base + LoRA`` product to the fused kernel ``peftlab.kernels.fused_lora_linear``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftlab.adapters.arithmetic import delta_weight, dora_weight_norm, lora_scaling, merged_weight
from peftlab.errors import PeftlabError
from peftlab.kernels.nf4 import KERNEL_SETTINGS, kernel_path

KERNEL_BACKENDS = KERNEL_SETTINGS


# --------------------------------------------------------------------------------------------------
# base weights


def is_4bit(layer: nn.Module) -> bool:
    return type(layer.weight).__name__ == "Params4bit"


def _is_8bit(layer: nn.Module) -> bool:
    return type(layer.weight).__name__ == "Int8Params"


def _unpack_cpu_packed_nf4(weight: Tensor, quant_state: Any) -> Tensor:
    """Dequantise a 4-bit weight that bitsandbytes repacked for its AVX512-BF16 CPU kernel.

    On CPUs with avx512_bf16, ``Linear4bit.forward`` in eval mode (input without grad) rewrites the
    weight in place into a [N, K/2] nibble layout with a bf16 absmax of shape [K/blocksize, N], and
    ``bitsandbytes.functional.dequantize_4bit`` no longer understands it. This undoes the layout
    permutation (as ``_convert_weight_packed_for_cpu_inverse`` does) but keeps the bf16 absmax as the
    kernel uses it, instead of re-quantising it, so the result is exactly the weight the forward uses.
    """
    n, k_half = weight.shape
    k = k_half * 2
    block_n = 32
    packed = weight.view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)  # low 32 then high 32
    codes = codes.reshape(n // block_n, k_half, block_n, 2).transpose(1, 2).reshape(n, k)
    values = quant_state.code.float().to(weight.device)[codes.long()]  # [N, K]
    absmax = quant_state.absmax.float().T  # [N, K / blocksize]
    blocksize = quant_state.blocksize
    return (values.view(n, k // blocksize, blocksize) * absmax.unsqueeze(-1)).view(n, k)


def base_weight_fp32(layer: nn.Module) -> Tensor:
    """The base layer's weight as a dense fp32 [out, in] tensor (NF4/FP4 dequantised), no grad."""
    with torch.no_grad():
        if is_4bit(layer):
            from peftlab.kernels.nf4 import dequantize_4bit

            weight = layer.weight
            quant_state = weight.quant_state
            if getattr(quant_state, "packing_format_for_cpu", False):
                return _unpack_cpu_packed_nf4(weight.data, quant_state)
            return dequantize_4bit(weight.data, quant_state).float()
        if _is_8bit(layer):
            raise PeftlabError(
                f"{type(layer).__name__} holds an 8-bit weight: DoRA and merging need a dense or 4-bit base. "
                "Load the base in 4-bit (NF4) or in bf16/fp32 instead."
            )
        return layer.weight.detach().float()


def _base_weight_for_dora(layer: nn.Module, dtype: torch.dtype) -> Tensor:
    """The base weight as PEFT's DoRA sees it (``dequantize_module_weight(...).to(x.dtype)``)."""
    if is_4bit(layer) or _is_8bit(layer):
        return base_weight_fp32(layer).to(dtype)
    return layer.weight.to(dtype)


# --------------------------------------------------------------------------------------------------
# fused kernel lookup


@functools.lru_cache(maxsize=1)
def _fused_lora_linear() -> Callable[..., Tensor] | None:
    """``peftlab.kernels.fused_lora_linear`` if that kernel exists in this install, else None."""
    import importlib

    try:
        module = importlib.import_module("peftlab.kernels.fused_lora_linear")
    except ImportError:
        return None
    fn = getattr(module, "fused_lora_linear", None)
    return fn if callable(fn) else None


def check_backend(backend: str) -> str:
    if backend not in KERNEL_BACKENDS:
        raise PeftlabError(f"kernel_backend={backend!r} is not one of {', '.join(KERNEL_BACKENDS)}.")
    return backend


# --------------------------------------------------------------------------------------------------
# the layer


class LoraLinear(nn.Module):
    """A frozen linear base layer plus a trainable low-rank update: ``y = W x + s·B A dropout(x)``.

    Parameter names match PEFT's with the adapter name stripped (``lora_A.weight``,
    ``lora_B.weight``, ``lora_magnitude_vector``), so ``state_dict`` keys map 1:1 onto PEFT's files.
    The LoRA branch runs in the LoRA weights' dtype (fp32 by default) and is cast back to the base
    output dtype, as in PEFT.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        lora_alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: bool = True,
        kernel_backend: str = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise PeftlabError(f"LoRA rank r must be a positive integer, got r={r}.")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)  # frozen; inject_lora/remove_lora save and restore the flags
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling: float = lora_scaling(lora_alpha, r, use_rslora=use_rslora)
        self.lora_dropout: nn.Module = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        device = next(base_layer.parameters()).device
        # nn.Linear's constructor draws its default init like PEFT's does, so under one torch seed
        # peftlab and PEFT consume the RNG identically and produce the same A.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init_lora_weights:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.use_dora = bool(use_dora)
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:
            initial_norm = self._weight_norm(self.lora_B.weight @ self.lora_A.weight)
            self.lora_magnitude_vector = nn.Parameter(initial_norm)
        self.kernel_backend = check_backend(kernel_backend)
        self.merged = False  # True while merge() has folded the update into the base weight
        self._unmerged_weight: Tensor | None = None

    @property
    def lora_parameters(self) -> list[nn.Parameter]:
        params = [self.lora_A.weight, self.lora_B.weight]
        if self.lora_magnitude_vector is not None:
            params.append(self.lora_magnitude_vector)
        return params

    def _weight_norm(self, lora_weight: Tensor, scaling: float | None = None) -> Tensor:
        """Per-output-row L2 norm of ``W + s·BA`` in the LoRA dtype (PEFT's DoRA ``get_weight_norm``)."""
        with torch.no_grad():
            dtype = lora_weight.dtype
            weight = _base_weight_for_dora(self.base_layer, dtype)
            s = self.scaling if scaling is None else scaling
            return dora_weight_norm(weight, s * lora_weight).to(dtype)

    def uses_fused_kernel(self, x: Tensor) -> bool:
        """Whether a forward on ``x`` runs ``fused_lora_linear`` (:func:`peftlab.kernels.nf4.kernel_path`'s rule;
        DoRA always takes the PyTorch path). That kernel draws its dropout keep-mask as a bool tensor."""
        return not self.use_dora and kernel_path(self.kernel_backend, x.device)

    def _use_kernel(self, x: Tensor) -> Callable[..., Tensor] | None:
        return _fused_lora_linear() if self.uses_fused_kernel(x) else None

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.kernel_backend == "off":
            return self.base_layer(x)
        kernel = self._use_kernel(x)
        if kernel is not None:
            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
            # The kernel computes in x's dtype; bitsandbytes' Linear4bit computes in its compute_dtype and
            # returns the input dtype. Cast around the kernel so both paths compute the same thing.
            compute = getattr(self.base_layer, "compute_dtype", None) if is_4bit(self.base_layer) else None
            xk = x.to(compute) if compute is not None else x
            y = kernel(
                xk, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling,
                dropout_p=p, training=self.training, backend=self.kernel_backend,
            )
            return y.to(x.dtype)
        return self.torch_forward(x)

    def torch_forward(self, x: Tensor) -> Tensor:
        """The plain-PyTorch path (PEFT's ``lora.Linear`` / ``lora.Linear4bit`` forward, one adapter)."""
        result = self.base_layer(x)
        if is_4bit(self.base_layer):
            # bitsandbytes may return a view that autograd cannot modify; PEFT clones here as well.
            result = result.clone()
        out_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        if not self.use_dora:
            return (result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(out_dtype)

        # DoRA: y = m / ‖W + sBA‖_row · (W x + s B A x), the norm treated as a constant (DoRA §4.3).
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result: Tensor | None = result
        else:
            x = self.lora_dropout(x)
            base_result = None
        weight = _base_weight_for_dora(self.base_layer, x.dtype)
        with torch.no_grad():  # PEFT detaches the norm: it is a constant for backprop (DoRA paper, §4.3)
            lora_weight = (self.lora_B.weight @ self.lora_A.weight).to(x.dtype)
            weight_norm = dora_weight_norm(weight, self.scaling * lora_weight).to(x.dtype)
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
        lora_result = self.lora_B(self.lora_A(x))
        if base_result is not None:
            bias = self.base_layer.bias
            if bias is not None:
                base_result = base_result - bias
        else:
            base_result = F.linear(x, weight)
        # summed in PEFT's order (the DoRA term first), so even bf16 outputs round identically
        result = result + ((mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling)
        return result.to(out_dtype)

    def delta_weight(self) -> Tensor:
        """``s·B·A`` in fp32, shape [out, in]."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def merged_weight(self) -> Tensor:
        """The dense fp32 weight that reproduces this layer's output without the LoRA branch."""
        if self.merged:
            raise PeftlabError("this LoRA layer is merged already; call unmerge() first.")
        with torch.no_grad():
            return merged_weight(base_weight_fp32(self.base_layer), self.lora_A.weight, self.lora_B.weight,
                                 self.scaling, self.lora_magnitude_vector if self.use_dora else None)

    def merge(self) -> None:
        """Fold the update into the dense base weight in place, for inference without the LoRA branch.

        The unmerged weight is kept (one extra copy of the base weight) so :meth:`unmerge` restores it
        bit for bit; subtracting ``ΔW`` again, as PEFT does, would not. 4-bit bases cannot be merged in
        place: :func:`peftlab.adapters.lora_inject.merge_lora` replaces them by dense layers instead.
        """
        if self.merged:
            return
        if is_4bit(self.base_layer) or _is_8bit(self.base_layer):
            raise PeftlabError(
                "a quantized base weight cannot hold the merged update in place; use "
                "peftlab.adapters.lora_inject.merge_lora(model), which replaces the layer by a dense nn.Linear."
            )
        weight = self.base_layer.weight
        with torch.no_grad():
            merged = self.merged_weight().to(weight.dtype)
            self._unmerged_weight = weight.detach().clone()
            weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: the base weight gets its exact original values back."""
        if not self.merged:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, use_dora={self.use_dora}, "
            f"kernel_backend={self.kernel_backend!r}"
        )
