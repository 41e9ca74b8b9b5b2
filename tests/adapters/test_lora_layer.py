"""peftlab.adapters.lora_layer: LoraLinear computes what PEFT's lora.Linear / Linear4bit compute (plain, rsLoRA,
DoRA; fp32, bf16 and NF4 bases; train mode with dropout), merges in place and back bit for bit, trains (grads
to A and B, with and without gradient checkpointing), and hands its product to the fused kernel when asked.

Ground truth is the installed PEFT: the same base model, the same LoRA weights (B set non-zero, DoRA
magnitudes perturbed) must give the same logits through peftlab's layers as through PEFT's.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import get_peft_model
from peft_parity import (
    VARIANTS,
    logits,
    make_pair,
    our_params,
    peft_config,
    peft_params,
    quantize_linears_4bit,
    randomise_lora,
)

from peftlab.adapters.lora_inject import inject_lora, lora_modules, set_kernel_backend
from peftlab.adapters.lora_layer import LoraLinear, base_weight_fp32
from peftlab.errors import PeftlabError

KERNEL_FILE = Path(__file__).resolve().parents[2] / "kernels" / "fused_lora_linear.py"

# (target_modules, layers): "all-linear"; an explicit suffix list; a list restricted to some layers
TARGETS = {
    "all-linear": ("all-linear", None),
    "list": (["q_proj", "v_proj", "down_proj"], None),
    "list+layers": (["q_proj", "o_proj", "up_proj"], [1, 3]),
}


# ------------------------------------------------------------------------------------------ forward parity


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_peft(tiny_base, input_ids, variant, target):
    target_modules, layers = TARGETS[target]
    pm, ours = make_pair(tiny_base, variant, target_modules, layers)
    expected = logits(pm, input_ids)
    assert not torch.allclose(expected, logits(tiny_base, input_ids), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_bf16_base_matches_peft(tiny_base, input_ids, variant):
    """bf16 base, fp32 LoRA weights (as PEFT's autocast_adapter_dtype): bf16 output, rounded like PEFT's."""
    pm, ours = make_pair(copy.deepcopy(tiny_base).to(torch.bfloat16), variant, ["q_proj", "down_proj"])
    assert {p.dtype for p in our_params(ours).values()} == {torch.float32}
    got, expected = logits(ours, input_ids), logits(pm, input_ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=0 if variant == "lora" else 1e-2, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_forward_matches_peft_on_4bit_base(tiny_base_4bit, input_ids, variant):
    pm, ours = make_pair(tiny_base_4bit, variant)
    assert isinstance(ours.model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear4bit)
    torch.testing.assert_close(logits(ours, input_ids), logits(pm, input_ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_train_mode_with_dropout_matches_peft(tiny_base, input_ids, variant):
    """Same seed -> same dropout masks (one draw per wrapped layer, in model order) -> same loss and grads."""
    cfg = peft_config(target=["q_proj", "down_proj"], lora_dropout=0.2, **VARIANTS[variant])
    pm = get_peft_model(copy.deepcopy(tiny_base), cfg).train()
    randomise_lora(peft_params(pm))
    ours = copy.deepcopy(tiny_base)
    inject_lora(ours, r=8, alpha=16, dropout=0.2, target_modules=["q_proj", "down_proj"], **VARIANTS[variant])
    with torch.no_grad():
        for k, p in our_params(ours).items():
            p.copy_(peft_params(pm)[k])
    losses, grads = [], []
    for model, params in ((pm.train(), peft_params(pm)), (ours.train(), our_params(ours))):
        torch.manual_seed(7)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad for k, p in params.items()})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ merge


def test_merge_in_place_and_unmerge_restores_exact_weights(tiny_base, input_ids):
    _, ours = make_pair(tiny_base, "dora", ["q_proj", "up_proj"])
    expected = logits(ours, input_ids)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in lora_modules(ours).items()}
    for m in lora_modules(ours).values():
        m.merge()
    assert all(m.merged for m in lora_modules(ours).values())
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=1e-5, rtol=0)
    for n, m in lora_modules(ours).items():
        m.unmerge()
        assert torch.equal(m.base_layer.weight, originals[n])
    torch.testing.assert_close(logits(ours, input_ids), expected, atol=0, rtol=0)


def test_merge_in_place_refuses_4bit_base(tiny_base_4bit):
    layer = LoraLinear(copy.deepcopy(tiny_base_4bit.model.layers[0].self_attn.q_proj), r=2, lora_alpha=4)
    with pytest.raises(PeftlabError, match="use peftlab.adapters.lora_inject.merge_lora"):
        layer.merge()


def test_dequantise_cpu_packed_4bit_weight(tiny_base):
    """bitsandbytes repacks NF4 weights in place for its AVX512-BF16 CPU kernel; merging must still work."""
    lin = tiny_base.model.layers[0].mlp.down_proj
    layer = quantize_linears_4bit(nn.Sequential(copy.deepcopy(lin)), skip=())[0]
    before = base_weight_fp32(layer)
    assert (before - lin.weight).abs().max() < 0.05  # NF4 error
    if not layer.support_avx512bf16_for_cpu and not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no avx512_bf16: bitsandbytes never repacks")
    layer.support_avx512bf16_for_cpu = True
    layer.eval()(torch.randn(2, lin.in_features))
    assert layer.weight.quant_state.packing_format_for_cpu
    after = base_weight_fp32(layer)
    torch.testing.assert_close(after, before, atol=1e-3, rtol=0)  # only the absmax went to bf16


# ------------------------------------------------------------------------------------------ training


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def test_training_step_gives_grads_to_a_and_b(tiny_base, input_ids):
    torch.manual_seed(0)
    model = copy.deepcopy(tiny_base).train()
    inject_lora(model, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "down_proj"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _loss(model, input_ids).backward()
    mods = lora_modules(model).values()
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in mods)
    assert all(m.lora_A.weight.grad.abs().sum() == 0 for m in mods)  # B = 0 at init
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    opt.step()
    opt.zero_grad()
    _loss(model, input_ids).backward()
    assert all(m.lora_A.weight.grad.abs().sum() > 0 for m in mods)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_gradient_checkpointing_gives_same_lora_grads(tiny_base, input_ids, variant):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = copy.deepcopy(tiny_base)
        inject_lora(model, r=4, alpha=8, dropout=0.1, **VARIANTS[variant])
        randomise_lora(our_params(model))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(1)
        _loss(model, input_ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ kernels


def test_kernel_backend_dispatch_matches_torch_path():
    if not KERNEL_FILE.exists():
        pytest.skip("kernels/fused_lora_linear.py is not written yet")
    torch.manual_seed(0)
    base = nn.Linear(64, 96, bias=True)
    layer = LoraLinear(base, r=8, lora_alpha=16)
    randomise_lora({"a": layer.lora_A.weight, "b": layer.lora_B.weight})
    x = torch.randn(5, 64)
    expected = layer.torch_forward(x)
    layer.kernel_backend = "triton"
    assert layer._use_kernel(x) is not None
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    model = nn.Sequential(layer)
    set_kernel_backend(model, "off")
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)
    # a 4-bit NF4 base (double quant, fp32 compute)
    base4 = quantize_linears_4bit(nn.Sequential(nn.Linear(64, 96)), skip=())[0]
    layer4 = LoraLinear(base4, r=8, lora_alpha=16)
    randomise_lora({"a": layer4.lora_A.weight, "b": layer4.lora_B.weight})
    expected = layer4.torch_forward(x)
    layer4.kernel_backend = "triton"
    torch.testing.assert_close(layer4(x), expected, atol=1e-5, rtol=1e-5)


def test_auto_backend_uses_torch_path_on_cpu():
    layer = LoraLinear(nn.Linear(16, 16), r=2, lora_alpha=4, kernel_backend="auto")
    assert layer._use_kernel(torch.randn(1, 16)) is None
    layer.kernel_backend = "triton"
    layer.use_dora = True
    assert layer._use_kernel(torch.randn(1, 16)) is None  # DoRA always runs the PyTorch path
