"""peftlab.adapters.arithmetic: scaling, ΔW, W + ΔW and DoRA's row norm equal PEFT's own on the same tensors.

Ground truth is the installed PEFT: a ``peft.tuners.lora.Linear`` over an ``nn.Linear`` is given the same A, B
(and DoRA magnitude) and asked for its scaling, its ``get_delta_weight`` and the weight its ``merge()`` leaves.
The shapes are odd (not multiples of anything) so that no tiling hides a difference.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLinear
from peft.utils.other import get_pattern_key

from peftlab.adapters.arithmetic import (
    delta_weight,
    dora_weight_norm,
    lora_scaling,
    merged_weight,
    pattern_value,
)

OUT, IN, R = 37, 53, 5


def peft_layer(alpha: float, *, rslora: bool = False, dora: bool = False, seed: int = 0):
    """A PEFT LoRA layer over a random fp32 linear, with random A, B and magnitude."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=g))
    config = LoraConfig(r=R, lora_alpha=alpha, use_rslora=rslora, use_dora=dora)
    layer = PeftLinear(base, "default", config, r=R, lora_alpha=alpha, use_rslora=rslora, use_dora=dora)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(R, IN, generator=g) * 0.3)
        layer.lora_B["default"].weight.copy_(torch.randn(OUT, R, generator=g) * 0.3)
        if dora:
            layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.rand(OUT, generator=g))
    return layer


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_scaling_and_delta_equal_pefts(rslora):
    layer = peft_layer(alpha=12, rslora=rslora)
    s = lora_scaling(12, R, use_rslora=rslora)
    assert s == layer.scaling["default"]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    got = delta_weight(a, b, s)
    assert got.dtype == torch.float32 and got.shape == (OUT, IN)
    assert torch.equal(got, layer.get_delta_weight("default"))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
def test_merged_weight_equals_pefts_merge(dora, rslora):
    layer = peft_layer(alpha=7, rslora=rslora, dora=dora, seed=1)
    weight = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    magnitude = layer.lora_magnitude_vector["default"].weight.detach().clone() if dora else None
    got = merged_weight(weight, a, b, layer.scaling["default"], magnitude)
    layer.merge()
    assert torch.equal(got, layer.base_layer.weight.detach())
    assert not torch.equal(got, weight)  # the update is not a no-op


def test_dora_row_norm_equals_pefts_weight_norm():
    layer = peft_layer(alpha=3, dora=True, seed=2)
    weight = layer.base_layer.weight.detach()
    ba = layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()
    s = layer.scaling["default"]
    expected = layer.lora_magnitude_vector["default"].get_weight_norm(weight, ba, scaling=s)
    assert torch.equal(dora_weight_norm(weight, s * ba), expected)
    # PEFT initialises the magnitude with this norm: the magnitude of a fresh DoRA layer is it
    fresh = PeftLinear(layer.base_layer, "fresh", LoraConfig(r=R, lora_alpha=3, use_dora=True), r=R, lora_alpha=3,
                       use_dora=True)
    fa, fb = fresh.lora_A["fresh"].weight.detach(), fresh.lora_B["fresh"].weight.detach()
    assert torch.equal(dora_weight_norm(weight, s * (fb @ fa)), fresh.lora_magnitude_vector["fresh"].weight)


def test_half_precision_factors_are_multiplied_in_fp32():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(R, IN, generator=g).bfloat16(), torch.randn(OUT, R, generator=g).bfloat16()
    assert torch.equal(delta_weight(a, b, 0.5), 0.5 * (b.float() @ a.float()))


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj",
                                  "model.layers.1.mlp.down_proj", "q_proj", "model.layers.1.self_attn.k_proj"])
def test_pattern_value_is_pefts_get_pattern_key(name):
    pattern = {r"layers\.1\.mlp\.down_proj": 4, "q_proj": 8, r"model\.layers\.10\..*": 2, "v_proj": 16}
    key = get_pattern_key(pattern.keys(), name)
    assert pattern_value(pattern, name, 32) == pattern.get(key, 32)
    assert pattern_value(None, name, 32) == 32
