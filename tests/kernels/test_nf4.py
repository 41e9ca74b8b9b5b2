"""NF4/FP4 dequantisation: Triton kernel (interpreter on CPU) and PyTorch reference vs bitsandbytes, bit for bit.

Ground truth is bitsandbytes itself: ``bitsandbytes.functional.dequantize_4bit`` where its CPU C kernel is
right, and bitsandbytes' default (PyTorch) backend otherwise. bitsandbytes 0.50's CPU C kernel mis-scales
weights whose even ``in_features`` is not a multiple of the block size (see kernels/nf4.py); the
round-trip test below shows that our output is the correct one for those shapes.

One code is compared by value, not by bits: FP4 0b1000 is -0.0 in peftlab (and in bitsandbytes' CUDA and
scalar CPU kernels) but +0.0 in bitsandbytes' AVX-512 CPU kernel and default backend, so which sign
bitsandbytes returns here depends on the CPU the suite runs on. The scalar-kernel test below pins the
behaviour of CPUs without AVX-512 on any machine.
"""
from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from peftlab.kernels.nf4 import (
    FP4_NEGATIVE_ZERO,
    bnb_cpu_dequant_is_exact,
    code_book,
    dequantize_4bit,
    fp4_negative_zero_mask,
    kernel_path,
    nf4_dequantize,
    reference_nf4_dequantize,
)

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


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, fp4_zero: torch.Tensor | None = None) -> None:
    """Same bits everywhere; where ``fp4_zero`` (FP4 code 0b1000) ``actual`` must be -0.0 and ``expected``
    any zero (bitsandbytes' sign there depends on the CPU, see the module docstring)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    # torch.equal treats -0.0 == 0.0; compare the raw bits as well
    assert torch.equal(actual, expected)
    bits = torch.int32 if actual.dtype == torch.float32 else torch.int16
    same_bits = actual.view(bits) == expected.view(bits)
    if fp4_zero is not None:
        assert bool((actual[fp4_zero] == 0).all() and torch.signbit(actual[fp4_zero]).all()), "FP4 0b1000 is -0.0"
        assert bool((expected[fp4_zero] == 0).all())
        same_bits |= fp4_zero
    assert bool(same_bits.all()), f"{int((~same_bits).sum())} elements differ in their bits"


def fp4_zero_mask(packed: torch.Tensor, qs) -> torch.Tensor | None:
    return fp4_negative_zero_mask(packed, qs) if qs.quant_type == "fp4" else None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("nested", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequant_matches_bitsandbytes_bitwise(dtype, quant_type, nested, backend):
    zero_codes = 0
    for shape in SHAPES:
        _, packed, qs = quantize(shape, dtype, quant_type, nested)
        out = nf4_dequantize(packed, qs, backend=backend)
        zero = fp4_zero_mask(packed, qs)
        assert_bitwise_equal(out, bnb_dequant(packed, qs), zero)
        zero_codes += int(zero.sum()) if zero is not None else 0
    assert quant_type == "nf4" or zero_codes > 0, "the FP4 data never hit code 0b1000: the exception is untested"


def _fp4_with_zero_code(shape, dtype) -> tuple[torch.Tensor, object]:
    """An FP4 weight whose codes include 0b1000 (bitsandbytes' CPU quantiser maps +1e-6 next to 1.0 there)."""
    w = torch.full(shape, -1e-6)
    w.view(-1)[0], w.view(-1)[1] = 1.0, 1e-6
    packed, qs = bnbF.quantize_4bit(w.to(dtype), blocksize=64, quant_type="fp4", compress_statistics=False)
    assert bool(fp4_negative_zero_mask(packed, qs).any())
    return packed, qs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp4_zero_code_is_negative_zero_like_bitsandbytes_scalar_cpu_kernel(dtype):
    """bitsandbytes' scalar CPU kernel — what a CPU without AVX-512 runs for every shape — gives -0.0 for
    FP4 code 0b1000. Any x86 CPU takes that path for a row length that is not a multiple of 16 within one
    block (the AVX-512 branch needs 16 | in_features), so this pins the AVX2 behaviour on every machine:
    there peftlab and bitsandbytes agree in every bit, the zero code included."""
    packed, qs = _fp4_with_zero_code((1, 40), dtype)
    expected = bnbF.dequantize_4bit(packed, qs)
    zero = fp4_negative_zero_mask(packed, qs)
    assert bool(torch.signbit(expected[zero]).all()), "bitsandbytes' scalar CPU kernel: FP4 0b1000 is -0.0"
    for backend in ("torch", "triton"):
        assert_bitwise_equal(nf4_dequantize(packed, qs, backend=backend), expected)  # no exception needed
    assert_bitwise_equal(dequantize_4bit(packed, qs), expected)
    # the code book itself is a copy: bitsandbytes' table (shared through its cache) is untouched
    assert code_book(qs, packed.device)[FP4_NEGATIVE_ZERO].signbit() and not qs.code[FP4_NEGATIVE_ZERO].signbit()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit_gives_the_same_bits_as_the_kernels(quant_type):
    """peftlab's bitsandbytes wrapper (DoRA, merge, the fused path's PyTorch side) gives the kernels' bits on
    every shape — bitsandbytes' C kernel where right (its AVX-512 +0.0 for FP4 0b1000 made -0.0), the
    reference where not."""
    for dtype in DTYPES:
        for shape in [*SHAPES, (1, 40), (64, 64)]:
            for nested in (False, True):
                _, packed, qs = quantize(shape, dtype, quant_type, nested)
                assert_bitwise_equal(dequantize_4bit(packed, qs), nf4_dequantize(packed, qs, backend="torch"))
    if quant_type == "fp4":  # (64, 128): the shape bitsandbytes' AVX-512 kernel takes, on CPUs that have it
        packed, qs = _fp4_with_zero_code((64, 128), torch.float32)
        assert bool(dequantize_4bit(packed, qs)[fp4_negative_zero_mask(packed, qs)].signbit().all())


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


# every kernels setting x device: (takes the kernel path, a kernel's use_triton — None: the kernel refuses the name)
KERNEL_PATH_TABLE = {
    ("auto", "cuda"): True, ("auto", "cpu"): False,
    ("triton", "cuda"): True, ("triton", "cpu"): True,
    ("torch", "cuda"): False, ("torch", "cpu"): False,
    ("off", "cuda"): False, ("off", "cpu"): False,
}


@pytest.mark.parametrize("setting, device", list(KERNEL_PATH_TABLE))
def test_kernel_path_is_one_rule_for_kernels_layers_and_planner(setting, device, monkeypatch):
    """kernel_path is the one statement of "auto = Triton on CUDA only, triton = anywhere, torch/off = PyTorch":
    the planner calls it with a device name, LoraLinear with its input's device, the kernels through use_triton."""
    import types

    from peftlab.kernels import nf4
    from torch import nn

    from peftlab.adapters.lora_layer import LoraLinear
    from peftlab.engine import planner

    expected = KERNEL_PATH_TABLE[setting, device]
    for where in (device, f"{device}:0" if device == "cuda" else device, torch.device(device)):
        assert kernel_path(setting, where) is expected
    assert planner.kernel_path is kernel_path  # what the planner counts follows the same rule
    layer = LoraLinear(nn.Linear(8, 8), r=2, lora_alpha=4, kernel_backend=setting)
    x = types.SimpleNamespace(device=torch.device(device))  # only the input's device is read
    assert layer.uses_fused_kernel(x) is expected
    layer.use_dora = True
    assert layer.uses_fused_kernel(x) is False  # DoRA: always PyTorch's
    if setting == "off":  # a kernel has no "off": the name is refused there
        with pytest.raises(PeftlabError, match="backend must be one of"):
            nf4.use_triton(setting, torch.device(device), "test")
        return
    # a kernel runs Triton exactly where the rule says (Triton is installed; CPU tensors run in the interpreter)
    assert nf4.use_triton(setting, torch.device(device), "test") is expected
    monkeypatch.setattr(nf4, "_HAS_TRITON", False)  # auto falls back to the reference without Triton
    if setting == "triton":
        with pytest.raises(PeftlabError, match="needs the `triton` package"):
            nf4.use_triton(setting, torch.device(device), "test")
    else:
        assert nf4.use_triton(setting, torch.device(device), "test") is False
    monkeypatch.setattr(nf4, "_HAS_TRITON", True)
    monkeypatch.setattr(nf4, "triton_is_interpreted", lambda: False)
    if setting == "triton" and device == "cpu":  # forced on CPU tensors without the interpreter: refused
        with pytest.raises(PeftlabError, match="needs CUDA tensors"):
            nf4.use_triton(setting, torch.device(device), "test")


def test_kernel_path_refuses_an_unknown_setting():
    with pytest.raises(PeftlabError, match=r"kernels='cuda' is not one of auto, triton, torch, off"):
        kernel_path("cuda", "cuda")
