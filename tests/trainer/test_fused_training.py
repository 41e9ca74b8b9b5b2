"""Training through the Triton kernels (interpreter on CPU) gives the same loss curve as the PyTorch path.

`kernels: triton` routes every LoRA layer through `fused_lora_linear` (NF4 dequantised inside the GEMM
tiles) and the loss through the Triton `fused_linear_cross_entropy`; `kernels: torch` runs the PyTorch
references. 8 QLoRA steps of the micro model in fp32 (every step's update feeds the next, so kernel differences
would compound) must give the same per-step losses.
"""
from __future__ import annotations

import pytest
import torch
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fused-training")]


def test_qlora_steps_fused_match_unfused(tmp_path):
    # One held-out row: the final eval (through the Triton loss) still runs, but nothing here asserts on it and
    # in the interpreter 4 rows cost ~14 s of this test's 54 s (measured serially).
    data = make_quickstart_data(tmp_path / "data", n_train=48, n_eval=1)
    curves = {}
    for backend in ("triton", "torch"):
        raw = tiny_recipe_dict(data, tmp_path / backend, train={"max_steps": 8, "grad_accum": 1,
                                                                "micro_batch_size": 1, "eval_at_start": False},
                               )
        raw["kernels"] = backend
        raw["output"]["plot"] = False
        raw["output"]["report_to"] = ["jsonl"]
        trainer = Trainer(recipe_from_dict(raw), quiet=True)
        if backend == "triton":  # the fused path really ran: every LoRA layer dispatches to Triton
            from peftlab.adapters.lora_inject import lora_modules

            assert {m.kernel_backend for m in lora_modules(trainer.model).values()} == {"triton"}
        curves[backend] = trainer.train().losses
    assert len(curves["triton"]) == 8
    torch.testing.assert_close(torch.tensor(curves["triton"]), torch.tensor(curves["torch"]), rtol=1e-4, atol=1e-5)
