"""Fused (Q)LoRA linear: Triton (interpreter on CPU) vs the PyTorch reference, forward and backward.

Ground truth: :func:`reference_lora_linear` (bitsandbytes dequant + torch matmuls), itself checked against
HF PEFT's LoRA layer on a bitsandbytes Linear4bit and against a hand-written fp64 formula.
"""
from __future__ import annotations

import importlib

import bitsandbytes as bnb
import pytest
import torch
from peftlab.kernels import aot

fll = importlib.import_module("peftlab.kernels.fused_lora_linear")  # the module (the package binds the function)
from peftlab.kernels.fused_lora_linear import (
    fused_lora_linear,
    gemm_config,
    lora_block_r,
    reference_lora_linear,
)
from peftlab.kernels.nf4 import nf4_dequantize

from peftlab.errors import PeftlabError

TOL = {torch.float32: {"atol": 1e-5, "rtol": 5e-4}, torch.bfloat16: {"atol": 5e-3, "rtol": 5e-2}}


def make_base(in_f: int, out_f: int, *, quant: bool, dtype: torch.dtype, bias: bool, nested: bool = True,
              quant_type: str = "nf4", seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(dtype)
    b = (torch.randn(out_f, generator=g) * 0.1).to(dtype) if bias else None
    if not quant:
        lin = torch.nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias:
                lin.bias.copy_(b)
        return lin.requires_grad_(False)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=dtype, compress_statistics=nested,
                            quant_type=quant_type)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=nested, quant_type=quant_type)
    if bias:
        lin.bias = torch.nn.Parameter(b, requires_grad=False)
    return lin.to("cpu")  # quantises (Params4bit packs on the first .to())


def make_lora(in_f, out_f, r, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(r, in_f, generator=g) * 0.1).to(dtype).requires_grad_()
    b = (torch.randn(out_f, r, generator=g) * 0.1).to(dtype).requires_grad_()
    return a, b


def run(fn, x, base, a, b, s, dy, **kw):
    x = x.detach().clone().requires_grad_()
    y = fn(x, base, a, b, s, **kw)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy)
    return y, gx, ga, gb


def fp32_copies(x, base, a, b):
    """The same values in fp32: bf16 results are compared with the reference computed in fp32 from the
    same bf16 inputs (project tolerance rule). A 4-bit base stays as is: its dequantised bf16 weight is
    exactly representable in fp32 and the reference casts it to x's dtype."""
    if not hasattr(base.weight, "quant_state") and base.weight.dtype != torch.float32:
        dense = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(base.weight.float())
            if base.bias is not None:
                dense.bias.copy_(base.bias.float())
        base = dense.requires_grad_(False)
    a32 = a.detach().float().requires_grad_()
    b32 = b.detach().float().requires_grad_()
    return x.float(), base, a32, b32


def assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


# (lead shape, in, out, rank): 3x17=51 tokens do not divide any tile; 5x7 tokens with 40->72 and rank 64
CASES = [((3, 17), 96, 80, 8), ((3, 17), 96, 80, 16), ((5, 7), 40, 72, 64)]


def check_triton_vs_reference(lead, in_f, out_f, r, *, quant, dtype, seed, label=""):
    """Triton path vs the fp32 reference: y, dx, dA, dB, with bias and no dropout, then dropout (fixed
    mask) and no bias."""
    g = torch.Generator().manual_seed(seed)
    for bias, dropout in [(True, 0.0), (False, 0.25)]:
        base = make_base(in_f, out_f, quant=quant, dtype=dtype, bias=bias)
        a, b = make_lora(in_f, out_f, r, dtype)
        x = torch.randn(*lead, in_f, generator=g).to(dtype)
        mask = (torch.rand(*lead, in_f, generator=g) >= dropout) if dropout else None
        dy = torch.randn(*lead, out_f, generator=g).to(dtype)
        kw = {"dropout_p": dropout, "training": dropout > 0, "dropout_mask": mask}
        got = run(fused_lora_linear, x, base, a, b, 1.5, dy, backend="triton", **kw)
        ref = run(reference_lora_linear, *fp32_copies(x, base, a, b), 1.5, dy.float(), **kw)
        for name, t, e in zip(("y", "dx", "dA", "dB"), got, ref):
            assert t.dtype == dtype and t.shape == e.shape, name
            assert_close(t, e, dtype, f"{label}{name} bias={bias} dropout={dropout}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant", [True, False], ids=["nf4", "dense"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-r{c[3]}")
def test_triton_matches_reference(case, quant, dtype):
    lead, in_f, out_f, r = case
    check_triton_vs_reference(lead, in_f, out_f, r, quant=quant, dtype=dtype, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant", [True, False], ids=["nf4", "dense"])
def test_large_batch_dequant_gemm_path_matches_reference(quant, dtype, monkeypatch):
    """Above FUSED_IN_TILE_MAX_ROWS rows on a GPU the weight is dequantised once (Triton) and cuBLAS does
    the GEMM; force that path here (the Triton dequant runs in the interpreter) and hold it to the same
    tolerances as the fused kernels."""
    monkeypatch.setattr(fll, "_use_dequant_gemm", lambda x2: True)
    check_triton_vs_reference((3, 17), 128, 80, 16, quant=quant, dtype=dtype, seed=11, label="dequant-gemm ")


def test_triton_fp4_single_quant_and_fp32_lora_on_bf16_input():
    # other storage flavours: FP4 codes, single quant, fp32 adapters on a bf16 activation (PEFT's default
    # under autocast: LoRA branch in fp32, output in the activation dtype)
    base = make_base(96, 80, quant=True, dtype=torch.bfloat16, bias=True, nested=False, quant_type="fp4")
    a, b = make_lora(96, 80, 16, torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(51, 96, generator=g).to(torch.bfloat16)
    dy = torch.randn(51, 80, generator=g).to(torch.bfloat16)
    got = run(fused_lora_linear, x, base, a, b, 2.0, dy, backend="triton")
    ref = run(reference_lora_linear, x, base, a, b, 2.0, dy)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, t, e in zip(("y", "dx", "dA", "dB"), got, ref):
        assert_close(t, e, torch.bfloat16, name)


def test_reference_matches_fp64_formula_with_dropout():
    # the reference itself against y = x·Wᵀ + b + s·((x⊙m/(1-p))·Aᵀ)·Bᵀ in fp64, gradients by hand
    base = make_base(96, 80, quant=True, dtype=torch.float32, bias=True)
    a, b = make_lora(96, 80, 8, torch.float32)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(51, 96, generator=g)
    mask = torch.rand(51, 96, generator=g) >= 0.3
    dy = torch.randn(51, 80, generator=g)
    y, gx, ga, gb = run(reference_lora_linear, x, base, a, b, 0.5, dy, dropout_p=0.3, training=True,
                        dropout_mask=mask)
    w = nf4_dequantize(base.weight, base.weight.quant_state, backend="torch").double()
    m = mask.double() / 0.7
    xd, A, B, dy64 = x.double() * m, a.detach().double(), b.detach().double(), dy.double()
    y64 = x.double() @ w.T + base.bias.double() + 0.5 * (xd @ A.T) @ B.T
    gx64 = dy64 @ w + 0.5 * ((dy64 @ B) @ A) * m
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(gx.double(), gx64, atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(ga.double(), 0.5 * (dy64 @ B).T @ xd, atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(gb.double(), 0.5 * dy64.T @ (xd @ A.T), atol=1e-5, rtol=5e-4)


def test_reference_matches_peft_lora_on_linear4bit():
    # HF PEFT's LoRA layer on a bitsandbytes Linear4bit (in=128 so bitsandbytes' CPU kernel is exact)
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    base = make_base(128, 72, quant=True, dtype=torch.float32, bias=True)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False)
    layer = PeftLinear4bit(base, adapter_name="default", config=config, r=16, lora_alpha=32, lora_dropout=0.0,
                           init_lora_weights=False)
    layer.train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert layer.scaling["default"] == 2.0
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 19, 128, generator=g)
    dy = torch.randn(2, 19, 72, generator=g)
    xp = x.clone().requires_grad_()
    yp = layer(xp)
    gxp, gap, gbp = torch.autograd.grad(yp, (xp, a, b), dy)
    for backend in ("torch", "triton"):
        y, gx, ga, gb = run(fused_lora_linear, x, base, a, b, 2.0, dy, backend=backend)
        for name, t, e in zip(("y", "dx", "dA", "dB"), (y, gx, ga, gb), (yp, gxp, gap, gbp)):
            assert_close(t, e, torch.float32, f"{backend} {name} vs PEFT")


def test_dropout_mask_drawn_from_torch_rng_is_deterministic_and_exact():
    base = make_base(40, 24, quant=True, dtype=torch.float32, bias=False)
    a, b = make_lora(40, 24, 8, torch.float32)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    y1 = fused_lora_linear(x, base, a, b, 1.0, dropout_p=0.5, training=True, backend="triton")
    torch.manual_seed(11)
    mask = torch.empty(x.shape, dtype=torch.bool).bernoulli_(0.5)  # the documented draw
    y2 = reference_lora_linear(x, base, a, b, 1.0, dropout_p=0.5, training=True, dropout_mask=mask)
    y_nodrop = reference_lora_linear(x, base, a, b, 1.0)
    assert_close(y1, y2, torch.float32, "same seed, same mask")
    assert (y1 - y_nodrop).abs().max() > 1e-3  # dropout really applied, not ignored
    # eval mode: no dropout at all
    assert_close(fused_lora_linear(x, base, a, b, 1.0, dropout_p=0.5, backend="triton"), y_nodrop,
                 torch.float32, "eval")


def test_bias_gradient_when_bias_trains():
    base = make_base(40, 24, quant=True, dtype=torch.float32, bias=True)
    base.bias.requires_grad_(True)
    a, b = make_lora(40, 24, 8, torch.float32)
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(4))
    dy = torch.randn(9, 24, generator=torch.Generator().manual_seed(5))
    grads = []
    for backend in ("triton", "torch"):
        y = fused_lora_linear(x, base, a, b, 1.0, backend=backend)
        grads.append(torch.autograd.grad(y, base.bias, dy)[0])
    assert_close(grads[0], grads[1], torch.float32, "dbias")
    assert_close(grads[0], dy.sum(0), torch.float32, "dbias = dy.sum(0)")


def test_errors_are_peftlab_errors():
    base = make_base(40, 24, quant=False, dtype=torch.float32, bias=False)
    a, b = make_lora(40, 24, 8, torch.float32)
    x = torch.randn(4, 40)
    with pytest.raises(PeftlabError, match="dropout_mask"):
        fused_lora_linear(x, base, a, b, 1.0, dropout_mask=torch.ones(4, 40, dtype=torch.bool))
    with pytest.raises(PeftlabError, match="dropout_p"):
        fused_lora_linear(x, base, a, b, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(PeftlabError, match="lora_B"):
        fused_lora_linear(x, base, a, b[:, :4], 1.0)
    with pytest.raises(PeftlabError, match="in_features"):
        fused_lora_linear(torch.randn(4, 41), base, a, b, 1.0)
    base.weight.requires_grad_(True)
    with pytest.raises(PeftlabError, match="frozen"):
        fused_lora_linear(x, base, a, b, 1.0)
    with pytest.raises(PeftlabError, match="supports torch.nn.Linear"):
        fused_lora_linear(x, torch.nn.Conv1d(40, 24, 1), a, b, 1.0)


def test_auto_backend_on_cpu_is_the_reference():
    base = make_base(40, 24, quant=True, dtype=torch.float32, bias=True)
    a, b = make_lora(40, 24, 8, torch.float32)
    x = torch.randn(4, 40)
    torch.testing.assert_close(fused_lora_linear(x, base, a, b, 1.0),
                               reference_lora_linear(x, base, a, b, 1.0), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- AOT
# Launch configurations the dispatch really uses for Llama-3-8B-sized layers at bf16, 4k tokens.
AOT_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features, out_features)


def _fwd_sig(dt: str) -> dict[str, str]:
    return {"x_ptr": f"*{dt}", "w_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
            "code2_ptr": "*fp32", "offset": "fp32", "bias_ptr": f"*{dt}", "xa_ptr": "*fp32", "b_ptr": f"*{dt}",
            "y_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_xm": "i64",
            "stride_wn": "i64", "stride_xam": "i64", "stride_bn": "i64", "stride_ym": "i64", "scaling": "fp32"}


def _bwd_sig(dt: str) -> dict[str, str]:
    return {"dy_ptr": f"*{dt}", "w_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
            "code2_ptr": "*fp32", "offset": "fp32", "g_ptr": "*fp32", "a_ptr": f"*{dt}", "mask_ptr": "*u8",
            "dx_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_dym": "i64",
            "stride_wn": "i64", "stride_gm": "i64", "stride_ar": "i64", "stride_maskm": "i64", "stride_dxm": "i64",
            "lora_scale": "fp32"}


def aot_launches(tokens: int = 4096, r: int = 16) -> list:
    from peftlab.kernels import nf4

    common = {"QUANT": True, "W_ROUND": 2, "LOG2_BS": 6, "LOG2_BS2": 8, "NESTED": True, "DOT_PRECISION": "tf32",
                  "LORA_PRECISION": "tf32", "BLOCK_R": lora_block_r(r), "INTERPRETER": False}
    launches, seen = [], set()
    for in_f, out_f in AOT_SHAPES:
        for kind, (m, n, k) in (("fwd", (tokens, out_f, in_f)), ("bwd", (tokens, in_f, out_f))):
            cfg = gemm_config(m, n, k, torch.bfloat16, quantized=True)
            key = (kind, cfg)
            if key in seen:  # identical launch configs compile to identical cubins
                continue
            seen.add(key)
            blocks = {"BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "GROUP_M": cfg.GROUP_M}
            if kind == "fwd":
                launches.append((fll._fused_lora_fwd_kernel, _fwd_sig("bf16"),
                                 {**common, **blocks, "HAS_BIAS": False, "HAS_LORA": True},
                                 cfg.num_warps, cfg.num_stages))
            else:  # backward: dx = dy·W, GEMM over (M, K=in) with reduction over N=out
                launches.append((fll._fused_lora_bwd_dx_kernel, _bwd_sig("bf16"),
                                 {**common, **blocks, "HAS_LORA": True, "HAS_MASK": True},
                                 cfg.num_warps, cfg.num_stages))
    launches.append((nf4._nf4_dequant_kernel,
                     {"codes_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
                      "code2_ptr": "*fp32", "offset": "fp32", "out_ptr": "*bf16", "n_elements": "i64"},
                     {"LOG2_BS": 6, "LOG2_BS2": 8, "NESTED": True, "BLOCK": nf4.DEQUANT_BLOCK,
                      "MANUAL_BF16_RNE": False}, nf4.DEQUANT_NUM_WARPS, 3))
    return launches


def test_dispatch_uses_one_config_for_the_llama_shapes():
    # the AOT test below compiles exactly what gemm_config returns for these shapes
    cfgs = {gemm_config(4096, n, k, torch.bfloat16, True) for k, n in AOT_SHAPES}
    assert len(cfgs) == 1
    cfg = cfgs.pop()
    assert min(cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K, lora_block_r(16)) >= 16


@pytest.mark.slow
def test_aot_compile_sm80_sm89_sm90(capsys):
    # Compiles and prints registers/spills. Known (see bench/RESULTS.md): the 4-bit GEMMs currently hit 255
    # registers and spill a little (per-element 64-bit gather addresses of the in-tile dequant); the
    # standalone dequant kernel must not spill.
    reports = aot.assert_compiles(aot_launches(), archs=(80, 89, 90), capsys=capsys)
    assert {r.arch for r in reports} == {80, 89, 90}
    assert len(reports) == 3 * len(aot_launches())
    for r in reports:
        if r.name == "_nf4_dequant_kernel":
            assert r.n_spills == 0, r
