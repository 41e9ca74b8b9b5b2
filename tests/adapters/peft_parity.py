"""Shared by the LoRA tests (test_lora_layer, test_lora_inject, test_peft_format): a PEFT model and a peftlab
model on copies of one base holding the same LoRA weights, so that logits, files and merges can be compared
one to one. Ground truth is the installed PEFT."""
from __future__ import annotations

import copy

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from peftlab.adapters.lora_inject import inject_lora, lora_modules

VARIANTS = {
    "lora": {"use_rslora": False, "use_dora": False},
    "rslora": {"use_rslora": True, "use_dora": False},
    "dora": {"use_rslora": False, "use_dora": True},
}


def quantize_linears_4bit(
    model: nn.Module,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace every nn.Linear except ``skip`` by a quantized bnb Linear4bit, as a QLoRA loader would.

    ``support_avx512bf16_for_cpu`` is switched off on each new layer: on AVX512-BF16 CPUs bitsandbytes
    otherwise repacks the weight in place at the first eval forward and computes in bf16, which makes
    fp32 parity and merge tolerances meaningless.
    """
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and n.rsplit(".", 1)[-1] not in skip]
    for name, lin in targets:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant_type)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type=quant_type, module=q)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to("cpu")
        q.support_avx512bf16_for_cpu = False
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q)
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its bnb Linear4bit LoRA layer
    return model


def peft_config(r: int = 8, alpha: int = 16, target="all-linear", layers=None, lora_dropout=0.0,
                **kw) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=target,
                      layers_to_transform=layers, task_type="CAUSAL_LM", **kw)


def randomise_lora(params: dict[str, torch.Tensor], seed: int = 1) -> None:
    """Make every LoRA tensor informative: A, B ~ N(0, 0.05²), DoRA magnitude scaled by 1 ± 10 %."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(params):
            p = params[key]
            if "lora_magnitude_vector" in key:
                p.mul_(1 + 0.1 * (torch.rand(p.shape, generator=g) - 0.5) * 2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def peft_params(pm: PeftModel) -> dict[str, torch.Tensor]:
    """PEFT's live LoRA parameters under saved key names."""
    out = {}
    for name, p in pm.named_parameters():
        if "lora_" in name:
            key = name.replace(".default.weight", ".weight").replace(".default", "")
            key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            out[key] = p
    return out


def our_params(model: nn.Module) -> dict[str, nn.Parameter]:
    out = {}
    for name, m in lora_modules(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight
        if m.lora_magnitude_vector is not None:
            out[f"base_model.model.{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    return out


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def make_pair(base: nn.Module, variant: str, target="all-linear", layers=None, r=8, alpha=16):
    """(PEFT model, peftlab model) on copies of ``base`` holding the same randomised LoRA weights."""
    pm = get_peft_model(copy.deepcopy(base), peft_config(r, alpha, target, layers, **VARIANTS[variant]))
    pm.eval()
    randomise_lora(peft_params(pm))
    ours = copy.deepcopy(base)
    inject_lora(ours, r=r, alpha=alpha, target_modules=target, layers=layers, **VARIANTS[variant])
    ref = peft_params(pm)
    mine = our_params(ours)
    assert sorted(mine) == sorted(ref)
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(ref[k])
    return pm, ours.eval()
