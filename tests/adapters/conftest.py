"""Fixtures of the LoRA tests: the tiny model (fp32, and with NF4 linears), loaded once per module; a batch."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def tiny_base(tiny_dir: Path) -> nn.Module:
    """The fp32 tiny model, loaded once; tests deepcopy it."""
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_base_4bit(tiny_base: nn.Module) -> nn.Module:
    pytest.importorskip("bitsandbytes")
    from peft_parity import quantize_linears_4bit

    return quantize_linears_4bit(copy.deepcopy(tiny_base))


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
