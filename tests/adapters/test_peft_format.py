"""peftlab.adapters.peft_format: adapters saved in PEFT's files load in PEFT with the same logits and PEFT's
load in peftlab (rank/alpha patterns, DoRA); a config that does not fit its weights, a pickle, a damaged or
missing file is refused and leaves the model as it was; the per-module updates read from the files scale
as the layers do."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model
from peft_parity import VARIANTS, logits, make_pair, our_params, peft_config, peft_params, randomise_lora

from peftlab.adapters.arithmetic import delta_weight
from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.adapters.peft_format import (
    adapter_config,
    load_adapter,
    lora_state_dict,
    read_adapter_config,
    read_lora_updates,
    save_adapter,
    write_adapter,
)
from peftlab.errors import PeftlabError

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


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_updates_read_from_the_files_scale_as_the_layers_do(tiny_base, tmp_path, variant):
    """read_lora_updates (what the merge, the combination and the PEFT export read) gives each module the
    tensors and the scaling its LoraLinear has, rank and alpha patterns included."""
    model = copy.deepcopy(tiny_base)
    inject_lora(model, r=8, alpha=16, target_modules=["q_proj", "k_proj", "down_proj"], rank_pattern={"k_proj": 4},
                alpha_pattern={"down_proj": 5}, **VARIANTS[variant])
    randomise_lora(our_params(model))
    save_adapter(model, tmp_path, base_model_name_or_path="x")
    updates = read_lora_updates(tmp_path, read_adapter_config(tmp_path))
    layers = lora_modules(model)
    assert updates.keys() == layers.keys()
    rank = (lambda r: r ** 0.5) if variant == "rslora" else (lambda r: r)
    assert {layers[n].scaling for n in updates} == {16 / rank(8), 16 / rank(4), 5 / rank(8)}
    for name, update in updates.items():
        layer = layers[name]
        assert update.scaling == layer.scaling
        assert torch.equal(update.lora_A, layer.lora_A.weight) and torch.equal(update.lora_B, layer.lora_B.weight)
        assert torch.equal(delta_weight(update.lora_A, update.lora_B, update.scaling), layer.delta_weight())
        assert (update.magnitude is None) == (variant != "dora")
    cfg = read_adapter_config(tmp_path)
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(PeftlabError, match=r"unexpected tensor '.*q_proj.lora_C.weight' in the adapter weights"):
        read_lora_updates(tmp_path, cfg)


def test_write_adapter_writes_the_two_files_atomically_and_keeps_the_rest(tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "chat_template.jinja").write_text("{{ x }}")
    tensors = {"base_model.model.l.lora_A.weight": torch.ones(2, 3).t()}  # not contiguous: written contiguous
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["l"], "peft_type": "LORA"}
    assert write_adapter(out, tensors, config) == out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "chat_template.jinja"]
    assert (out / "adapter_config.json").read_text() == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert torch.equal(load_file(str(out / "adapter_model.safetensors"))["base_model.model.l.lora_A.weight"],
                       torch.ones(3, 2))
    assert read_adapter_config(out) == config

