"""4-bit (NF4 / FP4) dequantisation of bitsandbytes weights: Triton kernel + PyTorch reference.

We read bitsandbytes' storage exactly as it is, never a re-packed copy:

* ``Linear4bit.weight`` is a ``Params4bit`` of ``ceil(numel / 2)`` bytes (shape ``(n, 1)``; its dtype is the
  ``quant_storage`` dtype, viewed here as uint8). Element ``i`` of the row-major flattened weight lives in
  byte ``i // 2``: the HIGH nibble holds the even element, the LOW nibble the odd one
  (``packed = q[0::2] << 4 | q[1::2]``). An odd element count is padded with one zero nibble.
* ``weight.quant_state`` (``bitsandbytes.functional.QuantState``): ``code`` is the 16-entry fp32 code book
  (NF4 or FP4), ``absmax`` one fp32 scale per ``blocksize`` consecutive elements of the FLAT weight (blocks
  run across rows when ``in_features % blocksize != 0``), ``shape`` / ``dtype`` of the original weight.
  With double quantisation (``compress_statistics=True``, ``quant_state.nested``) ``absmax`` is uint8 codes
  of ``absmax - offset`` quantised blockwise (``state2.blocksize``, normally 256) with the 256-entry
  dynamic code book ``state2.code`` and fp32 scales ``state2.absmax``.

Arithmetic, in bitsandbytes' own order (default/PyTorch backend, ``backends/default/ops.py``, and the CUDA
kernel ``kDequantizeBlockwise`` in ``csrc/kernels.cu``):

1. nested only: ``absmax = fp32(state2.code[q] * state2.absmax[i // 256])`` and then, as a SEPARATE fp32
   rounding, ``absmax = absmax + offset`` (two torch ops in bitsandbytes, so never a fused multiply-add);
2. ``value = fp32(code[nibble] * absmax[i // blocksize])``;
3. one round-to-nearest cast of that fp32 value to the output dtype.

The CUDA kernel follows the same order (``lut[nib] * local_abs_max`` in fp32, converted to ``T`` on store)
with the same fp32 NF4 constants. Our Triton kernel is launched with ``enable_fp_fusion=False`` so the
compiler cannot contract step 1 into an FMA on the GPU either.

FP4 code 0b1000 is NEGATIVE zero everywhere in peftlab (:func:`code_book`). The code is sign bit + zero
magnitude, and bitsandbytes' own kernels disagree on it: ``-0.0`` from the CUDA kernel
(``dDequantizeFP4Tree``: ``lut[0] * -1``) and from the scalar CPU kernel (``fp4_lut[8] = -0.0f``, the path a
CPU without AVX-512 takes for every shape, and an AVX-512 CPU for rows that are not a multiple of 16),
``+0.0`` from the AVX-512 CPU kernel and from the default (PyTorch) backend, whose table
``get_4bit_type("fp4")`` writes the entry as the Python integer ``-0`` (= +0). The values compare equal;
only the bits differ, so a bitwise comparison with bitsandbytes holds for every other code.

Known bitsandbytes 0.50 issue (found while writing these tests): on CPU, ``dequantize_4bit`` dispatches to
the C kernel ``cdequantize_blockwise_cpu_{nf4,fp4}_*`` whenever ``in_features`` is even, and that kernel
gives WRONG values when ``in_features % blocksize != 0`` (it does not follow blocks across rows the way the
quantiser wrote them: the round-trip error jumps from ~0.02 to ~0.1 on N(0, 0.05) weights). Its default
backend and the CUDA kernel are correct, and so are both paths here. See :func:`bnb_cpu_dequant_is_exact`.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from peftlab.errors import PeftlabError

try:  # Triton is a Linux-only dependency; the reference must work without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    triton = None
    tl = None
    _HAS_TRITON = False

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_BACKENDS = ("auto", "triton", "torch")  # a kernel's backend
# the recipe key ``kernels`` and ``LoraLinear.kernel_backend``; ``off`` = no fused kernel (a recipe: the model's own
# unfused path; a LoraLinear: its base layer alone)
KERNEL_SETTINGS = ("auto", "triton", "torch", "off")

# Elements per program of the standalone dequant kernel (512 packed bytes): big enough to amortise the
# program's index math, small enough that 4096x14336 still gives ~57k programs to fill any GPU.
DEQUANT_BLOCK = 1024
DEQUANT_NUM_WARPS = 4


# ---------------------------------------------------------------------------------------------- checks
def _numel(shape: Any) -> int:
    return int(math.prod(int(s) for s in shape))


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat uint8 tensor (a view: ``quant_storage`` may be bf16/fp32/int8...)."""
    flat = packed.reshape(-1) if packed.is_contiguous() else packed.contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def check_quant_state(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """Validate ``(packed, quant_state)`` and return the flat uint8 codes; raise PeftlabError on misuse."""
    if quant_state is None:
        raise PeftlabError(
            "nf4_dequantize needs the weight's quant_state (bitsandbytes Params4bit.quant_state); got None. "
            "Pass `layer.weight, layer.weight.quant_state` of a quantised bitsandbytes Linear4bit."
        )
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise PeftlabError(
            "this 4-bit weight was re-packed by bitsandbytes for AVX512 CPU inference (Linear4bit.forward in "
            "eval mode repacks it in place), which is not the bitsandbytes storage format peftlab reads. "
            "Move the layer to the device again (`layer.cuda()` / reload the model) or call bitsandbytes' "
            "`_convert_weight_packed_for_cpu_inverse` before using peftlab's 4-bit kernels."
        )
    qt = getattr(quant_state, "quant_type", None)
    if qt not in ("nf4", "fp4"):
        raise PeftlabError(f"quant_state.quant_type must be 'nf4' or 'fp4', got {qt!r}.")
    if quant_state.blocksize not in _VALID_BLOCKSIZES:
        raise PeftlabError(
            f"quant_state.blocksize={quant_state.blocksize} is not a bitsandbytes 4-bit block size "
            f"(one of {_VALID_BLOCKSIZES})."
        )
    if quant_state.dtype not in _FLOAT_DTYPES:
        raise PeftlabError(f"quant_state.dtype must be float16/bfloat16/float32, got {quant_state.dtype}.")
    codes = packed_bytes(packed)
    n = _numel(quant_state.shape)
    if codes.numel() != (n + 1) // 2:
        raise PeftlabError(
            f"packed 4-bit weight holds {codes.numel()} bytes but quant_state.shape={tuple(quant_state.shape)} "
            f"needs {(n + 1) // 2}; the weight and quant_state do not belong together."
        )
    if quant_state.nested:
        s2 = quant_state.state2
        if quant_state.absmax.dtype != torch.uint8 or s2.blocksize <= 0 or quant_state.offset is None:
            raise PeftlabError("double-quantised quant_state is malformed (expected uint8 absmax, state2, offset).")
    return codes


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise PeftlabError(f"backend must be one of {_BACKENDS}, got {backend!r}.")


def _resolve_out_dtype(quant_state: Any, out_dtype: torch.dtype | None) -> torch.dtype:
    dtype = quant_state.dtype if out_dtype is None else out_dtype
    if dtype not in _FLOAT_DTYPES:
        raise PeftlabError(f"out_dtype must be float16/bfloat16/float32, got {dtype}.")
    return dtype


def bnb_cpu_dequant_is_exact(quant_state: Any, device: torch.device) -> bool:
    """Whether ``bitsandbytes.functional.dequantize_4bit`` is right for this weight on ``device``.

    False only for the bitsandbytes 0.50 CPU C-kernel case described in the module docstring (even
    ``in_features`` that is not a multiple of ``blocksize``, with more than one block).
    """
    if device.type != "cpu":
        return True
    shape = tuple(quant_state.shape)
    last = shape[-1]
    if last % 2 == 1:  # bitsandbytes falls back to its (correct) PyTorch implementation
        return True
    return last % quant_state.blocksize == 0 or _numel(shape) <= quant_state.blocksize


# ------------------------------------------------------------------------------------------- reference
FP4_NEGATIVE_ZERO = 0b1000
"""The FP4 code whose value is -0.0 (sign bit set, zero magnitude); see the module docstring."""


def code_book(quant_state: Any, device: torch.device) -> torch.Tensor:
    """The 16-entry fp32 code book of ``quant_state`` on ``device`` (a copy), FP4 code 0b1000 as -0.0.

    Every peftlab dequantisation (reference, Triton kernels) reads its code book from here, so all of
    them agree with bitsandbytes' CUDA kernel on the sign of FP4's zero whatever the table says.
    """
    code = quant_state.code.to(device=device, dtype=torch.float32, copy=True)
    if _has_fp4_zero_code(quant_state):
        code[FP4_NEGATIVE_ZERO] = -0.0
    return code


def _has_fp4_zero_code(quant_state: Any) -> bool:
    """An FP4 code book whose code 0b1000 is a zero (bitsandbytes' always is; a custom one may not be)."""
    code = quant_state.code
    return quant_state.quant_type == "fp4" and code.numel() == 16 and float(code[FP4_NEGATIVE_ZERO]) == 0.0


def dequantize_absmax(quant_state: Any) -> torch.Tensor:
    """fp32 per-block scales; for double quant: ``code2[q] * absmax2[j // bs2]`` then ``+ offset``."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    s2 = quant_state.state2
    q = quant_state.absmax.reshape(-1).long()
    scale = s2.absmax.float().repeat_interleave(s2.blocksize)[: q.numel()]
    absmax = s2.code.float()[q] * scale  # one fp32 rounding ...
    return absmax + quant_state.offset.float()  # ... and a second one, as in bitsandbytes


def reference_nf4_dequantize(packed: torch.Tensor, quant_state: Any, *, out_dtype: torch.dtype | None = None,
                             backend: str = "auto") -> torch.Tensor:
    """Plain-PyTorch 4-bit dequantisation, bit for bit equal to bitsandbytes' CUDA kernel (see module
    docstring; FP4 code 0b1000 gives -0.0).

    Returns a tensor of ``quant_state.shape`` in ``out_dtype`` (default ``quant_state.dtype``). ``out_dtype``
    casts the fp32 ``code * absmax`` product directly (one rounding), like bitsandbytes' op with that dtype.
    ``backend`` exists for signature parity with :func:`nf4_dequantize` and is only validated.
    Memory: one int64 index and two fp32 temporaries of the weight's size (this is a reference).
    """
    _check_backend(backend)
    codes = check_quant_state(packed, quant_state)
    dtype = _resolve_out_dtype(quant_state, out_dtype)
    n = _numel(quant_state.shape)
    # 256-entry table byte -> (code[high nibble], code[low nibble]): the high nibble is the even element.
    code = code_book(quant_state, codes.device)
    byte = torch.arange(256, device=codes.device)
    pair_table = torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1)  # (256, 2) fp32
    values = pair_table[codes.long()].view(-1)[:n]  # (n,) fp32, one gather per byte
    absmax = dequantize_absmax(quant_state).to(codes.device)
    bs = quant_state.blocksize
    full = (n // bs) * bs
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    out[:full] = (values[:full].view(-1, bs) * absmax[: n // bs].view(-1, 1)).view(-1)
    if full < n:
        out[full:] = values[full:] * absmax[n // bs]
    return out.to(dtype).view(tuple(quant_state.shape))


# ---------------------------------------------------------------------------------------------- triton
if _HAS_TRITON:

    @triton.jit
    def _load_nf4_values(codes_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, flat, mask,
                         LOG2_BS: tl.constexpr, LOG2_BS2: tl.constexpr, NESTED: tl.constexpr):
        """fp32 ``code[nibble(flat)] * absmax[flat >> LOG2_BS]`` for int64 flat element indices ``flat``.

        Shared by the dequant kernel and the fused QLoRA GEMMs (called on their W tiles). Code books and
        scales are tiny and hit L1/L2; only the packed bytes stream from HBM (0.5 byte per weight).
        """
        byte = tl.load(codes_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        # even element -> high nibble, odd element -> low nibble
        nib = (byte >> ((1 - (flat & 1)) * 4).to(tl.int32)) & 0xF
        val = tl.load(code_ptr + nib, mask=mask, other=0.0)
        blk = flat >> LOG2_BS
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            a = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + (blk >> LOG2_BS2), mask=mask,
                                                                       other=0.0)
            a = a + offset  # separate rounding (launch with enable_fp_fusion=False on GPUs)
        else:
            a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return val * a

    @triton.jit
    def _f32_to_bf16_rne(v):
        """fp32 -> bf16 round-to-nearest-even with integer ops (finite inputs).

        Compiled GPU code gets RNE from ``.to(tl.bfloat16)`` (cvt.rn.bf16.f32); the Triton 3.6 interpreter
        truncates instead, so under the interpreter we round by hand to the same bits.
        """
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def cast_rne(v, DST: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr):
        """``v.to(DST)`` with round-to-nearest-even, also under the interpreter (see _f32_to_bf16_rne)."""
        if MANUAL_BF16_RNE and DST == tl.bfloat16:
            return _f32_to_bf16_rne(v)
        else:
            return v.to(DST)

    @triton.jit
    def _nf4_dequant_kernel(codes_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, out_ptr, n_elements,
                            LOG2_BS: tl.constexpr, LOG2_BS2: tl.constexpr, NESTED: tl.constexpr,
                            BLOCK: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr):
        # one program = BLOCK consecutive elements of the flat weight (BLOCK/2 packed bytes)
        pid = tl.program_id(0)
        flat = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # int64: no overflow past 2^31
        mask = flat < n_elements
        v = _load_nf4_values(codes_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, flat, mask,
                             LOG2_BS, LOG2_BS2, NESTED)
        tl.store(out_ptr + flat, cast_rne(v, out_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)


def triton_is_interpreted() -> bool:
    """True when the kernels in this module were created under ``TRITON_INTERPRET=1`` (CPU tensors)."""
    if not _HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_nf4_dequant_kernel, InterpretedFunction)


def check_triton_device(device: torch.device, what: str) -> None:
    """Raise a PeftlabError when Triton cannot run on ``device`` (no Triton / CPU without interpreter)."""
    if not _HAS_TRITON:
        raise PeftlabError(f"{what}: backend='triton' needs the `triton` package (Linux); use backend='torch'.")
    if device.type != "cuda" and not triton_is_interpreted():
        raise PeftlabError(
            f"{what}: backend='triton' needs CUDA tensors (got {device.type}); on CPU use backend='torch' "
            "(or set TRITON_INTERPRET=1 before importing triton to run the kernel in the interpreter)."
        )


def kernel_path(setting: str, device: torch.device | str) -> bool:
    """THE rule for a ``kernels`` setting, in one place: whether work on ``device`` takes the fused-kernel path.

    ``triton``: anywhere (CPU tensors run under ``TRITON_INTERPRET=1``); ``auto``: on CUDA only; ``torch`` and
    ``off``: the PyTorch path. Callers: every kernel's ``backend`` (:func:`use_triton`), ``LoraLinear``
    (``fused_lora_linear`` or PEFT's forward) and the memory planner (what autograd keeps). ``device``: a
    ``torch.device`` or its name ("cuda", "cuda:1", "cpu"). An unknown setting raises PeftlabError."""
    if setting not in KERNEL_SETTINGS:
        raise PeftlabError(f"kernels={setting!r} is not one of {', '.join(KERNEL_SETTINGS)}.")
    return setting == "triton" or (setting == "auto" and torch.device(device).type == "cuda")


def use_triton(backend: str, device: torch.device, what: str) -> bool:
    """Whether a kernel runs its Triton code: :func:`kernel_path` for the kernels' backends (they know no
    'off'); 'triton' where Triton cannot run raises, 'auto' takes the reference where Triton is not installed."""
    _check_backend(backend)
    if not kernel_path(backend, device):
        return False
    if backend == "triton":
        check_triton_device(device, what)
        return True
    return _HAS_TRITON


def quant_kernel_args(packed: torch.Tensor, quant_state: Any) -> dict[str, Any]:
    """Tensors/scalars/constexprs that describe a 4-bit weight to the Triton kernels (no copies)."""
    codes = check_quant_state(packed, quant_state)
    device = codes.device
    code = code_book(quant_state, device)
    if quant_state.nested:
        s2 = quant_state.state2
        absmax, absmax2 = quant_state.absmax, s2.absmax.to(device=device, dtype=torch.float32)
        code2 = s2.code.to(device=device, dtype=torch.float32)
        offset = float(quant_state.offset)
        log2_bs2 = int(s2.blocksize).bit_length() - 1
        if 1 << log2_bs2 != s2.blocksize:
            raise PeftlabError(f"double-quant state2.blocksize={s2.blocksize} is not a power of two.")
    else:
        absmax = quant_state.absmax.to(dtype=torch.float32)
        absmax2, code2, offset, log2_bs2 = absmax, code, 0.0, 0  # unused placeholders (NESTED=False)
    return {
        "codes": codes, "absmax": absmax, "code": code, "absmax2": absmax2, "code2": code2, "offset": offset,
        "LOG2_BS": int(quant_state.blocksize).bit_length() - 1, "LOG2_BS2": log2_bs2,
        "NESTED": bool(quant_state.nested),
    }


def nf4_dequantize(packed: torch.Tensor, quant_state: Any, *, out_dtype: torch.dtype | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Dequantise a bitsandbytes 4-bit weight (NF4 or FP4, single or double quant) to ``quant_state.shape``.

    Bit for bit equal to bitsandbytes' dequantisation (see the module docstring for the arithmetic; FP4 code
    0b1000 is -0.0, as bitsandbytes' CUDA kernel has it).
    ``backend``: "auto" = Triton on CUDA tensors, the PyTorch reference elsewhere; "triton" forces the kernel
    (CPU tensors work under ``TRITON_INTERPRET=1``); "torch" forces the reference.
    """
    device = packed.device
    if not use_triton(backend, device, "nf4_dequantize"):
        return reference_nf4_dequantize(packed, quant_state, out_dtype=out_dtype)
    dtype = _resolve_out_dtype(quant_state, out_dtype)
    args = quant_kernel_args(packed, quant_state)
    n = _numel(quant_state.shape)
    out = torch.empty(tuple(quant_state.shape), dtype=dtype, device=device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, DEQUANT_BLOCK),)
    _nf4_dequant_kernel[grid](
        args["codes"], args["absmax"], args["code"], args["absmax2"], args["code2"], args["offset"], out, n,
        LOG2_BS=args["LOG2_BS"], LOG2_BS2=args["LOG2_BS2"], NESTED=args["NESTED"], BLOCK=DEQUANT_BLOCK,
        MANUAL_BF16_RNE=triton_is_interpreted(), num_warps=DEQUANT_NUM_WARPS, enable_fp_fusion=False,
    )
    return out


def fp4_negative_zero_mask(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """Bool tensor of ``quant_state.shape``: True where the element's 4-bit code is FP4 0b1000."""
    codes = check_quant_state(packed, quant_state)
    n = _numel(quant_state.shape)
    hit = torch.stack(((codes >> 4) == FP4_NEGATIVE_ZERO, (codes & 0xF) == FP4_NEGATIVE_ZERO), dim=1)
    return hit.view(-1)[:n].view(tuple(quant_state.shape))


def dequantize_4bit(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` (its fast C/CUDA kernels) with peftlab's conventions.

    Where bitsandbytes 0.50's CPU C kernel is wrong (see :func:`bnb_cpu_dequant_is_exact`) the reference
    takes over, and FP4 code 0b1000 is always -0.0 (bitsandbytes' AVX-512 CPU kernel and default backend
    give +0.0): the result is the same bits on every CPU and on the GPU. For every place that
    dequantises a base weight outside the kernels (DoRA, merge, the fused path's PyTorch side).
    """
    codes = check_quant_state(packed, quant_state)
    if not bnb_cpu_dequant_is_exact(quant_state, codes.device) or codes.numel() <= 1:
        return reference_nf4_dequantize(packed, quant_state)
    import bitsandbytes.functional as bnbF

    out = bnbF.dequantize_4bit(packed.reshape(-1, 1), quant_state)
    if _has_fp4_zero_code(quant_state):
        out.masked_fill_(fp4_negative_zero_mask(packed, quant_state), -0.0)
    return out
