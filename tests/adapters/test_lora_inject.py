"""peftlab.adapters.lora_inject: LoRA put into a model's module instances and taken out again — the modules PEFT's
rules select, PEFT's initial draws under one seed, requires_grad flags restored, and merge_lora's dense layers
reproducing the adapter model (dense and NF4 bases); errors name what matched and what exists."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model
from peft_parity import VARIANTS, logits, make_pair, our_params, peft_config, peft_params

from peftlab.adapters.lora_inject import (
    inject_lora,
    lora_modules,
    merge_lora,
    remove_lora,
    set_kernel_backend,
)
from peftlab.adapters.lora_layer import LoraLinear
from peftlab.errors import PeftlabError


def test_wrapped_modules_and_init_match_peft_under_one_seed(tiny_base):
    torch.manual_seed(123)
    pm = get_peft_model(copy.deepcopy(tiny_base), peft_config(target=["q_proj", "up_proj"], layers=[0, 2]))
    torch.manual_seed(123)
    ours = copy.deepcopy(tiny_base)
    names = inject_lora(ours, r=8, alpha=16, target_modules=["q_proj", "up_proj"], layers=[0, 2])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                     "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.up_proj"]
    ref, mine = peft_params(pm), our_params(ours)
    assert sorted(ref) == sorted(mine)
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], atol=0, rtol=0)  # same RNG draws: A kaiming, B zero
    assert all(m.lora_B.weight.abs().sum() == 0 for m in lora_modules(ours).values())


@pytest.mark.parametrize("kwargs", [
    {"target_modules": ["q_proj", "mlp.up_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0, 3]},
    # an exact name ignores layers_to_transform, a suffix does not
    {"target_modules": ["model.layers.1.self_attn.q_proj", "v_proj"], "layers_to_transform": 2},
    {"target_modules": ["k_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": r".*layers\.[02]\.self_attn\.(q|v)_proj"},
    {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.0.self_attn.v_proj"]},
    {"target_modules": ["q_proj", "o_proj"], "exclude_modules": r".*\.1\..*"},
])
def test_target_matching_is_pefts(tiny_base, kwargs):
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(r=4, **kwargs)
    names = [n for n, _ in tiny_base.named_modules() if n]
    expected = [n for n in names if check_target_module_exists(config, n) is True
                or isinstance(check_target_module_exists(config, n), re.Match)]
    model = copy.deepcopy(tiny_base)
    got = inject_lora(model, r=4, target_modules=kwargs["target_modules"],
                      layers=kwargs.get("layers_to_transform"), layers_pattern=kwargs.get("layers_pattern"),
                      exclude_modules=kwargs.get("exclude_modules"))
    assert expected and got == expected


def test_all_linear_skips_lm_head_and_scaling(tiny_base):
    model = copy.deepcopy(tiny_base)
    names = inject_lora(model, r=4, alpha=8)
    assert len(names) == 4 * 7 and "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoraLinear)
    assert {m.scaling for m in lora_modules(model).values()} == {2.0}
    model = copy.deepcopy(tiny_base)
    inject_lora(model, r=4, alpha=8, use_rslora=True, target_modules=r".*\.k_proj")
    assert len(lora_modules(model)) == 4
    assert {m.scaling for m in lora_modules(model).values()} == {4.0}  # 8 / sqrt(4)


def test_remove_lora_restores_original_modules(tiny_base):
    model = copy.deepcopy(tiny_base)
    model.model.embed_tokens.weight.requires_grad_(False)
    before = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = inject_lora(model, r=4, alpha=8, use_dora=True)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert all(model.get_submodule(n).base_layer is before[n] for n in names)
    remove_lora(model)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_matches_adapter_model(tiny_base, input_ids, variant):
    _, ours = make_pair(tiny_base, variant)
    expected = logits(ours, input_ids)
    merged = merge_lora(ours)
    assert not lora_modules(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_4bit_base_matches_adapter_model(tiny_base_4bit, input_ids, variant):
    _, ours = make_pair(tiny_base_4bit, variant)
    expected = logits(ours, input_ids)
    merged = merge_lora(ours)
    layer = merged.model.layers[2].mlp.gate_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32  # the compute dtype
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-4, rtol=0)


def test_merge_casts_once_to_requested_dtype(tiny_base):
    _, ours = make_pair(tiny_base, "lora", ["q_proj"])
    fp32 = lora_modules(ours)["model.layers.0.self_attn.q_proj"].merged_weight()
    merge_lora(ours, dtype=torch.bfloat16)
    w = ours.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, fp32.to(torch.bfloat16))


def test_error_when_nothing_matches(tiny_base):
    model = copy.deepcopy(tiny_base)
    with pytest.raises(PeftlabError, match=r"no module matched target_modules=\['qproj'\].*q_proj.*up_proj"):
        inject_lora(model, target_modules=["qproj"])
    with pytest.raises(PeftlabError, match="layers=\\[9\\]"):
        inject_lora(model, target_modules=["q_proj"], layers=[9])
    with pytest.raises(PeftlabError, match="r must be a positive integer, got r=0"):
        inject_lora(model, r=0)
    with pytest.raises(PeftlabError, match="not linear layers: model.layers.0.mlp \\(LlamaMLP\\)"):
        inject_lora(model, target_modules=["mlp"])
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    inject_lora(model, target_modules=["q_proj"])
    with pytest.raises(PeftlabError, match="already has LoRA layers"):
        inject_lora(model, target_modules=["k_proj"])
    with pytest.raises(PeftlabError, match="kernel_backend='cuda' is not one of"):
        set_kernel_backend(model, "cuda")
