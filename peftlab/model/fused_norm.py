"""RMSNorm modules of a loaded decoder replaced by peftlab's fused RMSNorm (``train.fused_norm``).

Per instance, never per class: each known transformers RMSNorm module inside the model peftlab loaded is
swapped for a :class:`FusedRMSNorm` that holds the SAME weight Parameter (state-dict keys, optimizer state,
ZeRO partitioning and checkpoints are untouched) and calls :func:`peftlab.kernels.rms_norm` — Triton on
CUDA, the PyTorch reference (transformers' own op sequence) elsewhere. transformers' classes are never
patched.

Known classes are matched by identity, not by name (a remote-code class called ``LlamaRMSNorm`` may compute
something else): Llama, Mistral, Qwen2, Qwen3 (weight · n rounded to x's dtype first) and Gemma, Gemma-2
(n · (1 + weight) in fp32, one rounding). Any other module whose class name ends in "RMSNorm" is left as
it is and named in one log line; a model without any known norm is refused.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.kernels import rms_norm

logger = logging.getLogger(__name__)


def known_norm_classes() -> dict[type, float]:
    """transformers RMSNorm class -> the offset its weight is stored with (1.0: Gemma's w - 1)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    return {LlamaRMSNorm: 0.0, MistralRMSNorm: 0.0, Qwen2RMSNorm: 0.0, Qwen3RMSNorm: 0.0,
            GemmaRMSNorm: 1.0, Gemma2RMSNorm: 1.0}


class FusedRMSNorm(nn.Module):
    """The norm of one decoder module, computed by :func:`peftlab.kernels.rms_norm` with its own weight."""

    def __init__(self, weight: nn.Parameter, eps: float, *, offset: float, backend: str, source: str) -> None:
        super().__init__()
        self.weight = weight  # the replaced module's Parameter itself, not a copy
        self.eps = float(eps)
        self.variance_epsilon = self.eps  # the attribute name of the Llama family, for code that reads it
        self.offset = float(offset)
        self.backend = backend
        self.source = source  # the class it replaced, for repr and logs

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps, offset=self.offset, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, replaces={self.source}"


def _eps(module: nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:  # pragma: no cover - every known class has one of the two
        raise PeftlabError(f"train.fused_norm: {type(module).__name__} has no eps attribute; set train.fused_norm: false")
    return float(eps)


def apply_fused_norm(model: nn.Module, *, backend: str = "auto") -> list[str]:
    """Replace every known RMSNorm instance of ``model`` in place; return the replaced module names.

    ``backend`` is the recipe's ``kernels`` ("auto" | "triton" | "torch"). Unknown RMSNorm classes are left
    unfused (one log line names them); a model without any known RMSNorm raises PeftlabError.
    """
    known = known_norm_classes()
    replaced: list[str] = []
    skipped: Counter[str] = Counter()
    for name, module in list(model.named_modules()):
        offset = known.get(type(module)) if name else None  # the root module itself is never swapped
        if offset is None:
            if type(module).__name__.endswith("RMSNorm") and not isinstance(module, FusedRMSNorm):
                skipped[type(module).__name__] += 1
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fused = FusedRMSNorm(module.weight, _eps(module), offset=offset, backend=backend,
                             source=type(module).__name__)
        setattr(parent, child, fused)
        replaced.append(name)
    if skipped:
        logger.warning("train.fused_norm: left %s unfused (peftlab fuses %s)",
                       ", ".join(f"{n} × {cls}" for cls, n in sorted(skipped.items())),
                       ", ".join(sorted(c.__name__ for c in known)))
    if not replaced:
        raise PeftlabError(
            f"train.fused_norm: true, but {type(model).__name__} has no RMSNorm module peftlab can fuse (it fuses "
            f"{', '.join(sorted(c.__name__ for c in known))}); set train.fused_norm: false for this model."
        )
    logger.info("train.fused_norm: %d RMSNorm modules run peftlab's fused RMSNorm (kernels=%s)", len(replaced),
                backend)
    return replaced
