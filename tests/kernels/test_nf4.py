"""NF4/FP4 dequantisation: Triton kernel (interpreter on CPU) and PyTorch reference vs bitsandbytes, bit for bit.

Ground truth is bitsandbytes itself: ``bitsandbytes.functional.dequantize_4bit`` where its CPU C kernel is
right, and bitsandbytes' default (PyTorch) backend otherwise. bitsandbytes 0.50's CPU C kernel mis-scales
weights whose even ``in_features`` is not a multiple of the block size (see kernels/nf4.py); the
round-trip test below shows that our output is the correct one for those shapes.
"""
from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from peftlab.kernels.nf4 import bnb_cpu_dequant_is_exact, nf4_dequantize, reference_nf4_dequantize

from peftlab.errors import PeftlabError

# bitsandbytes wraps its default-backend function in torch.compile; the undecorated function is the same
# arithmetic without a minutes-long compile on this CPU.
_bnb_default_dequant = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (33, 47): odd row length and total not a multiple of 64; (80, 96): blocks straddle rows; (64, 128):
# aligned; (5, 3): fewer elements than one block.
SHAPES = [(33, 47), (80, 96), (64, 128), (5, 3)]


def bnb_dequant(packed: torch.Tensor, qs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bitsandbytes' own dequantisation of (packed, qs) to ``dtype`` (default qs.dtype)."""
    dtype = dtype or qs.dtype
    if dtype == qs.dtype and bnb_cpu_dequant_is_exact(qs, packed.device):
        return bnbF.dequantize_4bit(packed, qs)
    absmax = qs.absmax
    if qs.nested:  # exactly bitsandbytes' dequantize_4bit preamble
        absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
    return _bnb_default_dequant(packed.reshape(-1).view(torch.uint8), absmax.float(), qs.code, qs.blocksize,
                                qs.shape, dtype)


def quantize(shape, dtype, quant_type, nested, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return w, packed, qs


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    # torch.equal treats -0.0 == 0.0; compare the raw bits as well
    assert torch.equal(actual, expected)
    bits = torch.int32 if actual.dtype == torch.float32 else torch.int16
    assert torch.equal(actual.view(bits), expected.view(bits))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequant_matches_bitsandbytes_bitwise(dtype, quant_type, nested, backend):
    for shape in SHAPES:
        _, packed, qs = quantize(shape, dtype, quant_type, nested)
        out = nf4_dequantize(packed, qs, backend=backend)
        assert_bitwise_equal(out, bnb_dequant(packed, qs))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dequant_direct_against_bnb_functional_on_aligned_shapes(backend):
    # where bitsandbytes' CPU C kernel is right, compare with the public function itself, no helper
    for dtype in DTYPES:
        for shape, bs in [((64, 128), 64), ((48, 256), 128), ((33, 47), 64), ((16, 4096), 4096)]:
            _, packed, qs = quantize(shape, dtype, "nf4", nested=True, blocksize=bs)
            assert bnb_cpu_dequant_is_exact(qs, packed.device)
            assert_bitwise_equal(nf4_dequantize(packed, qs, backend=backend), bnbF.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_dtype_casts_fp32_product_once(backend):
    _, packed, qs = quantize((33, 47), torch.bfloat16, "nf4", nested=True)
    for out_dtype in DTYPES:
        out = nf4_dequantize(packed, qs, out_dtype=out_dtype, backend=backend)
        assert_bitwise_equal(out, bnb_dequant(packed, qs, out_dtype))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes_triton(blocksize):
    _, packed, qs = quantize((40, 72), torch.bfloat16, "nf4", nested=True, blocksize=blocksize)
    assert_bitwise_equal(nf4_dequantize(packed, qs, backend="triton"), bnb_dequant(packed, qs))


def test_round_trip_error_is_quantisation_error_where_bnb_cpu_kernel_is_wrong():
    # (80, 96) with blocksize 64: blocks straddle rows. Our dequant reconstructs within half the largest NF4
    # code gap times the block absmax; bitsandbytes' CPU C kernel does not (documented in kernels/nf4.py).
    w, packed, qs = quantize((80, 96), torch.float32, "nf4", nested=False)
    ours = reference_nf4_dequantize(packed, qs)
    gap = (qs.code[1:] - qs.code[:-1]).max().item() / 2
    bound = qs.absmax.repeat_interleave(64)[: w.numel()].view_as(w) * gap * 1.0001
    assert bool(((ours - w).abs() <= bound).all())
    assert not bnb_cpu_dequant_is_exact(qs, packed.device)


def test_quant_storage_other_than_uint8():
    w = (torch.randn(24, 40, generator=torch.Generator().manual_seed(3)) * 0.05).to(torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    expected = bnb_dequant(packed.view(torch.uint8), qs)
    for backend in ("torch", "triton"):
        assert_bitwise_equal(nf4_dequantize(packed, qs, backend=backend), expected)


def test_errors_name_the_problem():
    _, packed, qs = quantize((8, 64), torch.bfloat16, "nf4", nested=False)
    with pytest.raises(PeftlabError, match="quant_state"):
        nf4_dequantize(packed, None)
    with pytest.raises(PeftlabError, match="do not belong together"):
        nf4_dequantize(packed[:-1], qs)
    with pytest.raises(PeftlabError, match="backend"):
        nf4_dequantize(packed, qs, backend="cuda")
    with pytest.raises(PeftlabError, match="out_dtype"):
        nf4_dequantize(packed, qs, out_dtype=torch.int8)
