"""peftlab.lora: parity with PEFT (forward, files both ways, merge), 4-bit bases, grads, errors.

Ground truth is the installed PEFT: the same base model, the same LoRA weights (B set non-zero, DoRA
magnitudes perturbed) must give the same logits through peftlab's layers as through PEFT's.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peftlab.adapters.lora_inject import (
    inject_lora,
    lora_modules,
    merge_lora,
    remove_lora,
    set_kernel_backend,
)
from peftlab.adapters.lora_layer import LoraLinear, base_weight_fp32
from peftlab.adapters.peft_format import (
    adapter_config,
    load_adapter,
    lora_state_dict,
    read_adapter_config,
    save_adapter,
)
from peftlab.errors import PeftlabError

KERNEL_FILE = Path(__file__).resolve().parents[2] / "kernels" / "fused_lora_linear.py"

VARIANTS = {
    "lora": {"use_rslora": False, "use_dora": False},
    "rslora": {"use_rslora": True, "use_dora": False},
    "dora": {"use_rslora": False, "use_dora": True},
}
# (target_modules, layers): "all-linear"; an explicit suffix list; a list restricted to some layers
TARGETS = {
    "all-linear": ("all-linear", None),
    "list": (["q_proj", "v_proj", "down_proj"], None),
    "list+layers": (["q_proj", "o_proj", "up_proj"], [1, 3]),
}


# ------------------------------------------------------------------------------------------ helpers




@pytest.fixture(scope="module")
def tiny_base(tiny_dir: Path) -> nn.Module:
    """The fp32 tiny model, loaded once; tests deepcopy it."""
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_base_4bit(tiny_base: nn.Module) -> nn.Module:
    return quantize_linears_4bit(copy.deepcopy(tiny_base))


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


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


# ------------------------------------------------------------------------------------------ files


# peftlab-side targeting -> what adapter_config.json must say so that PEFT selects the same modules
SAVE_CASES = {
    "all-linear": ({"target_modules": "all-linear"}, None, None),
    "list+layers": ({"target_modules": ["q_proj", "o_proj", "up_proj"], "layers": [1, 3]},
                    ["o_proj", "q_proj", "up_proj"], [1, 3]),
    # PEFT refuses layers with a string target; peftlab applies them and writes a suffix list instead
    "all-linear+layers": ({"target_modules": "all-linear", "layers": [2]},
                          ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], [2]),
    # no suffix list + layers can say this: falls back to the full module names
    "exclude": (
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.1.self_attn.q_proj"]},
        "full",
        None,
    ),
}


@pytest.mark.parametrize(("variant", "case"), [("lora", "all-linear"), ("rslora", "list+layers"),
                                               ("dora", "all-linear+layers"), ("dora", "exclude")])
def test_saved_adapter_loads_in_peft(tiny_base, input_ids, tmp_path, variant, case):
    targeting, expected_targets, expected_layers = SAVE_CASES[case]
    ours = copy.deepcopy(tiny_base)
    names = inject_lora(ours, r=8, alpha=16, **targeting, **VARIANTS[variant])
    randomise_lora(our_params(ours))
    out = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="builtin:tiny-llama")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["use_dora"], cfg["use_rslora"]) == (variant == "dora", variant == "rslora")
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 16, 0.0)
    if expected_targets == "full":
        expected_targets = sorted(names)
    if expected_targets is not None:
        assert (cfg["target_modules"], cfg["layers_to_transform"]) == (expected_targets, expected_layers)
    assert set(load_file(str(out / "adapter_model.safetensors"))) == set(lora_state_dict(ours))
    pm = PeftModel.from_pretrained(copy.deepcopy(tiny_base), str(out)).eval()
    assert sorted(peft_params(pm)) == sorted(lora_state_dict(ours))
    torch.testing.assert_close(logits(pm, input_ids), logits(ours.eval(), input_ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("variant", "target", "n_modules"), [
    ("lora", ["q_proj", "k_proj", "gate_proj"], 12),
    ("rslora", ["q_proj", "k_proj", "gate_proj"], 12),
    ("dora", "all-linear", 28),  # PEFT writes "all-linear" out as the full module names
])
def test_peft_saved_adapter_loads_in_peftlab(tiny_base, input_ids, tmp_path, variant, target, n_modules):
    cfg = peft_config(target=target, rank_pattern={"k_proj": 4}, alpha_pattern={"gate_proj": 4},
                      **VARIANTS[variant])
    pm = get_peft_model(copy.deepcopy(tiny_base), cfg).eval()
    randomise_lora(peft_params(pm))
    pm.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(tiny_base)
    names = load_adapter(ours, tmp_path)
    assert len(names) == n_modules
    mods = lora_modules(ours)
    assert mods["model.layers.0.self_attn.k_proj"].r == 4 and mods["model.layers.0.self_attn.q_proj"].r == 8
    assert mods["model.layers.3.mlp.gate_proj"].lora_alpha == 4
    assert not any(p.requires_grad for p in ours.parameters())
    torch.testing.assert_close(logits(ours, input_ids), logits(pm, input_ids), atol=1e-6, rtol=0)


def test_load_adapter_trainable_and_reload_roundtrip(tiny_base, input_ids, tmp_path):
    _, ours = make_pair(tiny_base, "dora", ["v_proj"])
    save_adapter(ours, tmp_path, base_model_name_or_path="x", extra_config={"task_type": "CAUSAL_LM"})
    again = copy.deepcopy(tiny_base)
    load_adapter(again, tmp_path, trainable=True, kernel_backend="torch")
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n, _ in again.named_parameters() if "lora_" in n}
    assert all(m.kernel_backend == "torch" for m in lora_modules(again).values())
    torch.testing.assert_close(logits(again, input_ids), logits(ours, input_ids), atol=0, rtol=0)
    assert read_adapter_config(tmp_path)["base_model_name_or_path"] == "x"


# ------------------------------------------------------------------------------------------ merge


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


# ------------------------------------------------------------------------------------------ errors


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


def test_error_for_missing_or_invalid_adapter_files(tiny_base, tmp_path):
    with pytest.raises(PeftlabError, match="does not exist"):
        read_adapter_config(tmp_path / "nope")
    with pytest.raises(PeftlabError, match="adapter_config.json is missing"):
        load_adapter(copy.deepcopy(tiny_base), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftlabError, match="is not valid JSON"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 8}))
    with pytest.raises(PeftlabError, match="peftlab loads LoRA adapters only"):
        read_adapter_config(tmp_path)
    minimal = {"r": 8, "lora_alpha": 16, "target_modules": ["q"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps({**minimal, "modules_to_save": ["lm_head"]}))
    with pytest.raises(PeftlabError, match="modules_to_save=\\['lm_head'\\] is not supported"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**minimal, "init_lora_weights": "pissa"}))
    with pytest.raises(PeftlabError, match="init_lora_weights='pissa' rewrites the base weights"):
        read_adapter_config(tmp_path)
    _, ours = make_pair(tiny_base, "lora", ["q_proj"])
    save_adapter(ours, tmp_path, base_model_name_or_path="x")
    (tmp_path / "adapter_model.safetensors").unlink()
    model = copy.deepcopy(tiny_base)
    with pytest.raises(PeftlabError, match="adapter_model.safetensors is missing"):
        load_adapter(model, tmp_path)
    assert not lora_modules(model)


def test_error_for_key_mismatch_leaves_model_untouched(tiny_base, tmp_path):
    _, ours = make_pair(tiny_base, "lora", ["q_proj", "v_proj"])
    save_adapter(ours, tmp_path, base_model_name_or_path="x")
    path = tmp_path / "adapter_model.safetensors"
    weights = load_file(str(path))
    weights.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    weights["base_model.model.model.layers.1.self_attn.w_proj.lora_B.weight"] = torch.zeros(128, 8)
    save_file(weights, str(path))
    model = copy.deepcopy(tiny_base)
    before = dict(model.named_modules())
    with pytest.raises(PeftlabError) as err:
        load_adapter(model, tmp_path)
    msg = str(err.value)
    assert "missing keys: base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in msg
    assert "unexpected keys: base_model.model.model.layers.1.self_attn.w_proj.lora_B.weight" in msg
    assert all(dict(model.named_modules())[k] is before[k] for k in before)
    weights.pop("base_model.model.model.layers.1.self_attn.w_proj.lora_B.weight")
    weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] = torch.zeros(128, 4)
    save_file(weights, str(path))
    shapes = r"wrong shapes.*v_proj.lora_B.weight: file \(128, 4\) vs model \(128, 8\)"
    with pytest.raises(PeftlabError, match=shapes):
        load_adapter(model, tmp_path)


def test_adapter_config_is_a_valid_peft_lora_config(tiny_base):
    _, ours = make_pair(tiny_base, "rslora", ["q_proj"], [0])
    cfg = adapter_config(ours, base_model_name_or_path="builtin:tiny-llama", revision="main")
    parsed = LoraConfig(**{k: v for k, v in cfg.items() if k != "peft_type"})
    assert parsed.r == 8 and parsed.lora_alpha == 16 and parsed.use_rslora and parsed.revision == "main"
    assert cfg["target_modules"] == ["q_proj"] and cfg["layers_to_transform"] == [0]
