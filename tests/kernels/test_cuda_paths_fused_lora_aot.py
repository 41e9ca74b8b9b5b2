"""AOT compile (sm_90, the lent H200) of the in-tile fused QLoRA GEMMs in every launch configuration the dispatch picks
for 1-128 tokens — the path a GPU takes for short batches and gpu_check's "(NF4 in-tile)" parity case — with the
argument types of a real call: peftlab keeps the LoRA matrices in fp32 (``xa``/``B`` and ``g``/``A`` are fp32 pointers
beside bf16 activations), and fp32 compute runs IEEE dots on 16-64-row tiles. tests/kernels/test_fused_lora_linear.py
compiles the 4k-token bf16 configuration (with 16-bit LoRA pointers); these did not run anywhere before a GPU."""
from __future__ import annotations

import importlib

import pytest
import torch

# the module (the package attribute of that name is the function; see kernels/__init__.py)
fll = importlib.import_module("peftlab.kernels.fused_lora_linear")
aot = importlib.import_module("peftlab.kernels.aot")

TL = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def fwd_sig(dt: str) -> dict[str, str]:
    return {"x_ptr": f"*{dt}", "w_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
            "code2_ptr": "*fp32", "offset": "fp32", "bias_ptr": f"*{dt}", "xa_ptr": "*fp32", "b_ptr": "*fp32",
            "y_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_xm": "i32",
            "stride_wn": "i32", "stride_xam": "i32", "stride_bn": "i32", "stride_ym": "i32", "scaling": "fp32"}


def bwd_sig(dt: str) -> dict[str, str]:
    return {"dy_ptr": f"*{dt}", "w_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
            "code2_ptr": "*fp32", "offset": "fp32", "g_ptr": "*fp32", "a_ptr": "*fp32", "mask_ptr": f"*{dt}",
            "dx_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_dym": "i32",
            "stride_wn": "i32", "stride_gm": "i32", "stride_ar": "i32", "stride_maskm": "i32", "stride_dxm": "i32",
            "lora_scale": "fp32"}


def in_tile_launches() -> list[tuple]:
    """(kernel, signature, constexprs, warps, stages) of every distinct in-tile launch for 1..128 rows, the shapes of
    gpu_check's parity case (1000 in, 1544 out, r=16), bf16 and fp32 compute, a double-quantised NF4 base."""
    launches, seen = [], set()
    for dtype in (torch.bfloat16, torch.float32):
        precision = fll._precision(dtype)
        common = {"QUANT": True, "W_ROUND": fll._W_ROUND[dtype], "LOG2_BS": 6, "LOG2_BS2": 8, "NESTED": True,
                  "DOT_PRECISION": precision, "LORA_PRECISION": precision, "BLOCK_R": fll.lora_block_r(16),
                  "INTERPRETER": False}
        for m in range(1, fll.FUSED_IN_TILE_MAX_ROWS + 1):
            for kind, (mm, n, k) in (("fwd", (m, 1544, 1000)), ("bwd", (m, 1000, 1544))):
                cfg = fll.gemm_config(mm, n, k, dtype, quantized=True)
                if (dtype, kind, cfg) in seen:
                    continue
                seen.add((dtype, kind, cfg))
                blocks = {"BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "GROUP_M": cfg.GROUP_M}
                if kind == "fwd":
                    launches.append((fll._fused_lora_fwd_kernel, fwd_sig(TL[dtype]),
                                     {**common, **blocks, "HAS_BIAS": False, "HAS_LORA": True},
                                     cfg.num_warps, cfg.num_stages))
                else:
                    launches.append((fll._fused_lora_bwd_dx_kernel, bwd_sig(TL[dtype]),
                                     {**common, **blocks, "HAS_LORA": True, "HAS_MASK": False},
                                     cfg.num_warps, cfg.num_stages))
    return launches


def test_every_in_tile_configuration_is_covered():
    launches = in_tile_launches()
    # bf16: 16/32/64/128-row tiles; fp32: 16/32/64 — forward and backward each
    assert len(launches) == 2 * (4 + 3)
    assert {(lc[2]["BLOCK_M"], lc[2]["DOT_PRECISION"]) for lc in launches} == {
        (16, "tf32"), (32, "tf32"), (64, "tf32"), (128, "tf32"), (16, "ieee"), (32, "ieee"), (64, "ieee")}


@pytest.mark.slow
def test_in_tile_gemms_compile_for_sm90_with_fp32_lora_pointers(capsys):
    reports = aot.assert_compiles(in_tile_launches(), archs=(90,), capsys=capsys)
    assert len(reports) == len(in_tile_launches())
    # shared memory within the H200's 227 KiB per block (the launch fails past it, a spill only costs time)
    assert all(r.shared_bytes <= 227 * 1024 for r in reports), [r.row() for r in reports]
