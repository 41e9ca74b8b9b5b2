"""Whole-block (Q)LoRA autograd: the attention projections and the gated MLP as single autograd Functions.

Why: per-module QLoRA (:mod:`peftlab.kernels.fused_lora_linear`, PEFT, bitsandbytes) runs one autograd node per
linear layer plus a node per elementwise op in between. Every node saves its own input, so the block input x
is referenced three times in q/k/v, and the MLP keeps gate, up, silu(gate) and their product alive for
backward. Here one Function covers each group of linears that share an input:

* :func:`lora_projections` — any number of projections of the same x (q, k, v together; o alone):
  ``y_i = x·W_iᵀ + s_i·(x·A_iᵀ)·B_iᵀ``.
* :func:`lora_gated_mlp` — ``down(silu(gate(x)) ⊙ up(x))`` with LoRA on any of the three (SwiGLU MLP of
  Llama, Mistral, Qwen2).

Each frozen weight is dequantised into one reused per-(device, dtype) buffer (:class:`WeightBuffer`) right
before its GEMM and dequantised again in backward; the 16-bit weights are never saved. The GEMMs are
``torch.matmul`` (cuBLAS on a GPU); the LoRA up-projection is folded into the GEMM's output with ``addmm_``
(no (tokens, out) temporary). The rank-sized side products (x·Aᵀ, dy·B, the dA/dB reductions) are fp32
(:func:`peftlab.kernels.fused_lora_linear.matmul_f32`). Saved for backward: x, the (tokens, r) fp32 products
x·Aᵀ, the LoRA matrices and, in the MLP, gate and up (the minimum to run SwiGLU backward without recomputing
two GEMMs). dx is accumulated in place (``addmm_``) over every projection; the SwiGLU backward writes d_gate and
d_up into the saved gate/up and the dh buffer, so the MLP backward holds two extra (tokens, intermediate)
temporaries at most (on the Triton path, where :mod:`peftlab.kernels.swiglu`'s kernels do the SwiGLU forward and
the in-place backward, only h, recomputed for the down projection's dA). Because the saved gate/up are
overwritten, a second backward through the same graph (``retain_graph=True``) fails with autograd's
version-counter error rather than giving a wrong result.

Dequantisation (``backend``): "triton" = the Triton NF4 kernel (:mod:`peftlab.kernels.nf4`) writing straight
into the reused buffer (CPU tensors under ``TRITON_INTERPRET=1``); "torch" = bitsandbytes' own dequant
(:func:`peftlab.kernels.nf4.dequantize_4bit`, a fresh tensor each time); "auto" = Triton on CUDA, torch
elsewhere. Which of the two is faster on a given GPU is not measured yet (bench/gpu_check.py measures the
whole step). The compute dtype is x's dtype (callers cast x to the 4-bit layer's compute dtype first, as
:class:`peftlab.adapters.lora_layer.LoraLinear` does); outputs have x's dtype. LoRA dropout and base biases are
not implemented here: the module-level application keeps those modules on the per-module path.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from peftlab.errors import PeftlabError

from .fused_lora_linear import _Base, _describe_base, _validate, matmul_f32
from .nf4 import (
    _HAS_TRITON,
    DEQUANT_BLOCK,
    DEQUANT_NUM_WARPS,
    dequantize_4bit,
    quant_kernel_args,
    triton_is_interpreted,
    use_triton,
)

if _HAS_TRITON:
    import triton

    from .nf4 import _nf4_dequant_kernel
    from .swiglu import BLOCK as SWIGLU_BLOCK
    from .swiglu import NUM_WARPS as SWIGLU_WARPS
    from .swiglu import _swiglu_bwd_kernel, _swiglu_fwd_kernel


# ------------------------------------------------------------------------------------------ weights
class WeightBuffer:
    """One flat tensor per (device, dtype) that every frozen weight of a block is dequantised into.

    Sized to the largest weight seen (grown, never shrunk): one 16-bit copy of the biggest matrix
    (14336x4096 bf16 = 117 MB for an 8B model) instead of an allocation per projection per pass. The
    GEMMs run on the current stream in order, so reusing the buffer for the next weight is safe.
    """

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def view(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        n = shape[0] * shape[1]
        flat = self._flat.get(key)
        if flat is None or flat.numel() < n:
            self._flat.pop(key, None)  # free the small one before allocating the big one
            flat = torch.empty(n, dtype=dtype, device=device)
            self._flat[key] = flat
        return flat[:n].view(shape)

    def clear(self) -> None:
        self._flat.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._flat.values())


BUFFERS = WeightBuffer()


def _dequant_into(base: _Base, out: torch.Tensor) -> torch.Tensor:
    """The Triton NF4/FP4 dequant of ``base`` written into ``out`` (same launch as ``nf4_dequantize``)."""
    args = quant_kernel_args(base.weight, base.quant_state)
    n = out.numel()
    if n:
        _nf4_dequant_kernel[(triton.cdiv(n, DEQUANT_BLOCK),)](
            args["codes"], args["absmax"], args["code"], args["absmax2"], args["code2"], args["offset"], out, n,
            LOG2_BS=args["LOG2_BS"], LOG2_BS2=args["LOG2_BS2"], NESTED=args["NESTED"], BLOCK=DEQUANT_BLOCK,
            MANUAL_BF16_RNE=triton_is_interpreted(), num_warps=DEQUANT_NUM_WARPS, enable_fp_fusion=False,
        )
    return out


def frozen_weight(base: _Base, dtype: torch.dtype, use_tri: bool) -> torch.Tensor:
    """The (out, in) base weight in ``dtype``: a view of the dense weight when no cast is needed, else the
    shared buffer (Triton dequant or cast), or bitsandbytes' dequant when ``use_tri`` is False."""
    w = base.weight
    if not base.quantized:
        w = w.detach()
        if w.dtype == dtype:
            return w
        return BUFFERS.view(tuple(w.shape), dtype, w.device).copy_(w)
    if use_tri:
        return _dequant_into(base, BUFFERS.view((base.out_features, base.in_features), dtype, w.device))
    dense = dequantize_4bit(w.data, base.quant_state)
    return dense if dense.dtype == dtype else dense.to(dtype)


# ------------------------------------------------------------------------------------------ specs
@dataclasses.dataclass(frozen=True)
class LoraProjection:
    """One frozen linear (``torch.nn.Linear`` or bitsandbytes ``Linear4bit``, no bias) with an optional LoRA.

    ``lora_A`` (r, in) and ``lora_B`` (out, r) are both given or both None; ``scaling`` multiplies B·A.
    """

    base_layer: torch.nn.Module
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None
    scaling: float = 0.0

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None


@dataclasses.dataclass(frozen=True)
class _Spec:
    bases: tuple[_Base, ...]
    lora: tuple[bool, ...]
    scalings: tuple[float, ...]
    use_triton: bool


def _spec(x: torch.Tensor, projections: Sequence[LoraProjection], backend: str, what: str) -> tuple[_Spec, list]:
    """Validated bases + the flat [A0, B0, A1, B1, ...] list of the projections that have LoRA."""
    if not projections:
        raise PeftlabError(f"{what}: at least one projection is needed.")
    bases, flat = [], []
    for p in projections:
        base = _describe_base(p.base_layer)
        if base.bias is not None:
            raise PeftlabError(f"{what}: {type(p.base_layer).__name__} has a bias; biased projections take the "
                               "per-module path (peftlab.kernels.fused_lora_linear).")
        if (p.lora_A is None) != (p.lora_B is None):
            raise PeftlabError(f"{what}: lora_A and lora_B must both be given or both be None.")
        if p.has_lora:
            _validate(x, base, p.lora_A, p.lora_B)
            flat += [_contig(p.lora_A), _contig(p.lora_B)]
        elif base.in_features != x.shape[-1]:
            raise PeftlabError(f"{what}: x has {x.shape[-1]} features but a projection expects "
                               f"in_features={base.in_features}.")
        if not base.quantized and base.weight.requires_grad and torch.is_grad_enabled():
            raise PeftlabError(f"{what}: a base weight requires grad, but the block treats the base layers as "
                               "frozen; freeze it with `layer.weight.requires_grad_(False)`.")
        if base.weight.device != x.device:
            raise PeftlabError(f"{what}: a base weight is on {base.weight.device} but x is on {x.device}.")
        bases.append(base)
    spec = _Spec(tuple(bases), tuple(p.has_lora for p in projections),
                 tuple(float(p.scaling) for p in projections), use_triton(backend, x.device, what))
    return spec, flat


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _pairs(spec: _Spec, flat: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per projection: (A, B) or None, from the flat LoRA list."""
    out, i = [], 0
    for has in spec.lora:
        out.append((flat[i], flat[i + 1]) if has else None)
        i += 2 if has else 0
    return out


# --------------------------------------------------------------------------------------- forward/backward
def _project(x2: torch.Tensor, base: _Base, ab, s: float, use_tri: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` and the fp32 (M, r) ``x·Aᵀ`` (None without LoRA)."""
    y = x2 @ frozen_weight(base, x2.dtype, use_tri).t()
    if ab is None:
        return y, None
    a, b = ab
    xa = matmul_f32(x2, a.t())
    y.addmm_(xa.to(y.dtype), b.to(y.dtype).t(), alpha=s)
    return y, xa


def _project_backward(dy: torch.Tensor, x2: torch.Tensor, base: _Base, ab, xa, s: float, use_tri: bool,
                      dx: torch.Tensor | None, need_x: bool, need_a: bool, need_b: bool):
    """Accumulate ``dy·W + s·(dy·B)·A`` into dx (in place); return (dx, dA, dB)."""
    da = db = None
    if need_x:
        w = frozen_weight(base, dy.dtype, use_tri)
        if dx is None:
            dx = dy @ w
        else:
            dx.addmm_(dy, w)
    if ab is not None:
        a, b = ab
        if need_x or need_a:
            g = matmul_f32(dy, b)  # (M, r) fp32
            if need_x:
                dx.addmm_(g.to(dx.dtype), a.to(dx.dtype), alpha=s)
            if need_a:
                da = matmul_f32(g.t(), x2).mul_(s).to(a.dtype)
        if need_b:
            db = matmul_f32(dy.t(), xa).mul_(s).to(b.dtype)
    return dx, da, db


class LoraProjectionsFunction(torch.autograd.Function):
    """Projections of one input x: one node, x saved once, weights re-dequantised in backward."""

    @staticmethod
    def forward(ctx, spec: _Spec, x2: torch.Tensor, *flat: torch.Tensor):  # type: ignore[override]
        pairs = _pairs(spec, flat)
        ys, xas = [], []
        for base, ab, s in zip(spec.bases, pairs, spec.scalings):
            y, xa = _project(x2, base, ab, s, spec.use_triton)
            ys.append(y)
            if xa is not None:
                xas.append(xa)
        ctx.spec = spec
        ctx.n_flat = len(flat)
        ctx.save_for_backward(x2, *flat, *xas)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None):  # type: ignore[override]
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        x2, flat, xas = saved[0], saved[1:1 + ctx.n_flat], list(saved[1 + ctx.n_flat:])
        pairs = _pairs(spec, flat)
        need_x = ctx.needs_input_grad[1]
        grads: list[torch.Tensor | None] = []
        dx = None
        j = 0
        for i, (base, ab, s) in enumerate(zip(spec.bases, pairs, spec.scalings)):
            xa = xas.pop(0) if ab is not None else None
            need_a = ab is not None and ctx.needs_input_grad[2 + j]
            need_b = ab is not None and ctx.needs_input_grad[3 + j]
            j += 2 if ab is not None else 0
            dy = dys[i]
            if dy is None:
                grads += [None, None] if ab is not None else []
                continue
            dx, da, db = _project_backward(dy.reshape(-1, base.out_features), x2, base, ab, xa, s,
                                           spec.use_triton, dx, need_x, need_a, need_b)
            if ab is not None:
                if da is None and need_a:
                    da = torch.zeros_like(ab[0])
                grads += [da, db]
        if need_x and dx is None:
            dx = torch.zeros_like(x2)
        return (None, dx, *grads)


def _swiglu(gate: torch.Tensor, up: torch.Tensor, use_tri: bool) -> torch.Tensor:
    """``silu(gate)·up`` into a new tensor: one Triton kernel (:mod:`peftlab.kernels.swiglu`, fp32 math, one
    rounding) on the Triton path, two PyTorch ops otherwise."""
    if not use_tri:
        return F.silu(gate).mul_(up)
    h = torch.empty_like(gate)
    n_rows, width = gate.shape
    if h.numel():
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(width, SWIGLU_BLOCK))](
            gate, up, h, gate.stride(0), up.stride(0), h.stride(0), width, BLOCK=SWIGLU_BLOCK,
            MANUAL_BF16_RNE=triton_is_interpreted(), num_warps=SWIGLU_WARPS, num_stages=1)
    return h


def _swiglu_backward_(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                      use_tri: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU backward in place: returns (d_gate, d_up), written over the saved activations / dh.

    h = silu(g)·u: d_up = dh·silu(g); d_gate = dh·u·σ(g)·(1 + g·(1 − σ(g))). Triton path: one kernel that
    reads dh, g, u and writes d_gate over g and d_up over u. PyTorch path: two temporaries (σ, silu),
    d_gate over u and d_up over dh.
    """
    if use_tri:
        n_rows, width = gate.shape
        if gate.numel():
            _swiglu_bwd_kernel[(n_rows, triton.cdiv(width, SWIGLU_BLOCK))](
                dh, gate, up, dh.stride(0), gate.stride(0), up.stride(0), width, BLOCK=SWIGLU_BLOCK,
                MANUAL_BF16_RNE=triton_is_interpreted(), num_warps=SWIGLU_WARPS, num_stages=1)
        # written outside autograd's view: bump the version counters so a second backward fails loudly
        torch.autograd.graph.increment_version(gate)
        torch.autograd.graph.increment_version(up)
        return gate, up
    sig = torch.sigmoid(gate)
    silu = gate * sig
    up.mul_(dh)          # dh·u
    dh.mul_(silu)        # d_up
    silu.fill_(1).sub_(sig).mul_(gate).add_(1).mul_(sig)  # σ(g)·(1 + g·(1 − σ(g)))
    up.mul_(silu)        # d_gate
    return up, dh


class LoraGatedMlpFunction(torch.autograd.Function):
    """``down(silu(gate(x)) ⊙ up(x))`` with LoRA on any projection: one node for the whole MLP."""

    @staticmethod
    def forward(ctx, spec: _Spec, x2: torch.Tensor, *flat: torch.Tensor):  # type: ignore[override]
        (bg, bu, bd), (pg, pu, pd), (sg, su, sd) = spec.bases, _pairs(spec, flat), spec.scalings
        gate, xa_g = _project(x2, bg, pg, sg, spec.use_triton)
        up, xa_u = _project(x2, bu, pu, su, spec.use_triton)
        h = _swiglu(gate, up, spec.use_triton)
        out, ha = _project(h, bd, pd, sd, spec.use_triton)
        del h  # recomputed in backward from gate and up
        ctx.spec, ctx.n_flat = spec, len(flat)
        xas = [t for t in (xa_g, xa_u, ha) if t is not None]
        ctx.save_for_backward(x2, gate, up, *flat, *xas)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        x2, gate, up = saved[:3]
        flat, xas = saved[3:3 + ctx.n_flat], list(saved[3 + ctx.n_flat:])
        (bg, bu, bd), (pg, pu, pd), (sg, su, sd) = spec.bases, _pairs(spec, flat), spec.scalings
        xa_g = xas.pop(0) if pg is not None else None
        xa_u = xas.pop(0) if pu is not None else None
        ha = xas.pop(0) if pd is not None else None
        needs = list(ctx.needs_input_grad[2:])
        need_lora = [(needs.pop(0), needs.pop(0)) if p is not None else (False, False) for p in (pg, pu, pd)]
        dy = dy.reshape(-1, bd.out_features)
        # down: dh = dy·W_d + s·(dy·B_d)·A_d; dA_d needs h, recomputed once (then freed)
        dh, _, db_d = _project_backward(dy, x2, bd, pd, ha, sd, spec.use_triton, None, True, False,
                                        need_lora[2][1])
        da_d = None
        if need_lora[2][0]:
            h = _swiglu(gate, up, spec.use_triton)
            da_d = matmul_f32(matmul_f32(dy, pd[1]).t(), h).mul_(sd).to(pd[0].dtype)
            del h
        d_gate, d_up = _swiglu_backward_(dh, gate, up, spec.use_triton)
        need_x = ctx.needs_input_grad[1]
        dx, da_g, db_g = _project_backward(d_gate, x2, bg, pg, xa_g, sg, spec.use_triton, None, need_x,
                                           *need_lora[0])
        dx, da_u, db_u = _project_backward(d_up, x2, bu, pu, xa_u, su, spec.use_triton, dx, need_x,
                                           *need_lora[1])
        grads: list[torch.Tensor | None] = []
        for p, pair in ((pg, (da_g, db_g)), (pu, (da_u, db_u)), (pd, (da_d, db_d))):
            if p is not None:
                grads += list(pair)
        return (None, dx, *grads)


# ------------------------------------------------------------------------------------------ public API
def lora_projections(x: torch.Tensor, projections: Sequence[LoraProjection], *,
                     backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """``(base_i(x) + s_i·B_i(A_i(x)) for each projection)`` as one autograd node (see the module docstring).

    ``x`` (..., in); every projection reads the same x (q, k, v of an attention block; or o alone).
    Returns one (..., out_i) tensor per projection, in x's dtype.
    """
    spec, flat = _spec(x, projections, backend, "lora_projections")
    lead = x.shape[:-1]
    x2 = _contig(x.reshape(-1, x.shape[-1]))
    ys = LoraProjectionsFunction.apply(spec, x2, *flat)
    return tuple(y.view(*lead, y.shape[-1]) for y in ys)


def lora_gated_mlp(x: torch.Tensor, gate: LoraProjection, up: LoraProjection, down: LoraProjection, *,
                   backend: str = "auto") -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` (each a frozen base + optional LoRA) as one autograd node."""
    spec, flat = _spec(x, (gate, up), backend, "lora_gated_mlp")
    inter = spec.bases[0].out_features
    if spec.bases[1].out_features != inter:
        raise PeftlabError(f"lora_gated_mlp: gate has {inter} outputs but up has {spec.bases[1].out_features}.")
    h_probe = x.new_empty((0, inter))  # stands for h (dtype, device, features) in the checks, no allocation
    dspec, dflat = _spec(h_probe, (down,), backend, "lora_gated_mlp")
    spec = _Spec(spec.bases + dspec.bases, spec.lora + dspec.lora, spec.scalings + dspec.scalings,
                 spec.use_triton)
    lead = x.shape[:-1]
    x2 = _contig(x.reshape(-1, x.shape[-1]))
    out = LoraGatedMlpFunction.apply(spec, x2, *flat, *dflat)
    return out.view(*lead, out.shape[-1])


def reference_lora_projections(x: torch.Tensor, projections: Sequence[LoraProjection], *,
                               backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """Plain autograd, per projection: ``F.linear(x, dequant(W)) + s·F.linear(F.linear(x, A), B)`` (the
    signature of :func:`lora_projections`; ``backend`` is accepted and ignored)."""
    outs = []
    for p in projections:
        base = _describe_base(p.base_layer)
        y = F.linear(x, frozen_weight(base, x.dtype, False).clone())
        if p.has_lora:
            y = y + (F.linear(F.linear(x.to(p.lora_A.dtype), p.lora_A), p.lora_B) * p.scaling).to(y.dtype)
        outs.append(y)
    return tuple(outs)


def reference_lora_gated_mlp(x: torch.Tensor, gate: LoraProjection, up: LoraProjection, down: LoraProjection, *,
                             backend: str = "auto") -> torch.Tensor:
    """Plain autograd version of :func:`lora_gated_mlp` (same signature)."""
    g, u = reference_lora_projections(x, (gate, up))
    return reference_lora_projections(F.silu(g) * u, (down,))[0]
