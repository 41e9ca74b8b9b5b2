"""peftlab.export.combine: adapter combinations equal PEFT's ``add_weighted_adapter`` tensor for tensor.

Ground truth is the installed PEFT: two (or three) adapters saved by PEFT are loaded into one
PeftModel, combined there with ``add_weighted_adapter``, and the new adapter's A/B must equal what
``peftlab.combine.combine_adapters`` writes from the adapter files alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftlab.adapters.lora_inject import lora_modules
from peftlab.adapters.peft_format import load_adapter, read_adapter_config
from peftlab.cli.main import main
from peftlab.errors import PeftlabError
from peftlab.export.combine import combine_adapters, load_combine_config


def _base(micro_dir: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32).eval()


def _peft_adapter(micro_dir: Path, out: Path, seed: int, *, r: int = 8, alpha: int = 16, target=None,
                  rslora: bool = False) -> Path:
    """A PEFT-saved adapter whose A and B are random (B non-zero, so every ΔW is informative)."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=target or ["q_proj", "v_proj", "down_proj"],
                     use_rslora=rslora, lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = get_peft_model(_base(micro_dir), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(micro_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": _peft_adapter(micro_dir, root / "a", 1),
        "b": _peft_adapter(micro_dir, root / "b", 2, alpha=8, rslora=True),
        # different modules and rank: for cat / svd (and the union of targets)
        "c": _peft_adapter(micro_dir, root / "c", 3, r=4, alpha=4, target=["q_proj", "up_proj"]),
    }


@pytest.fixture(scope="module")
def peft_model(micro_dir, adapters) -> PeftModel:
    pm = PeftModel.from_pretrained(_base(micro_dir), str(adapters["a"]), adapter_name="a")
    pm.load_adapter(str(adapters["b"]), adapter_name="b")
    pm.load_adapter(str(adapters["c"]), adapter_name="c")
    return pm


def peft_combined(pm: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """The combined adapter ``name`` of ``pm`` under PEFT's saved key names."""
    out = {}
    for module_name, module in pm.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            out[f"base_model.model.{module_name}.lora_A.weight"] = module.lora_A[name].weight.detach().clone()
            out[f"base_model.model.{module_name}.lora_B.weight"] = module.lora_B[name].weight.detach().clone()
    return out


CASES = {
    # method: (adapters, weights, kwargs)
    "linear": (["a", "b"], [0.7, 0.4], {}),
    "linear-negative": (["a", "b"], [1.0, -0.5], {}),
    "ties": (["a", "b"], [1.0, 0.6], {"density": 0.5}),
    "magnitude_prune": (["a", "b"], [0.8, 0.8], {"density": 0.3}),
    "svd": (["a", "b", "c"], [1.0, 0.5, 0.8], {}),
    "ties_svd": (["a", "c"], [1.0, 0.5], {"density": 0.7, "svd_rank": 6}),
    "cat": (["a", "b", "c"], [1.0, 0.5, -0.3], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_combination_equals_peft(peft_model, adapters, tmp_path, case):
    names, weights, kwargs = CASES[case]
    method = case.split("-")[0]
    new = f"comb_{case.replace('-', '_')}"
    peft_model.add_weighted_adapter(names, weights, new, combination_type=method, **kwargs)
    expected = peft_combined(peft_model, new)
    result = combine_adapters([adapters[n] for n in names], weights, tmp_path / "out", method=method, **kwargs)
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(expected)
    for key in expected:
        if method.endswith("svd"):
            # the same LAPACK call on bit-identical input; allow the last-bit noise of multithreaded BLAS
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
        else:
            assert torch.equal(got[key], expected[key]), key
    cfg = read_adapter_config(tmp_path / "out")
    assert cfg["r"] == result.rank == peft_model.peft_config[new].r
    assert cfg["lora_alpha"] == cfg["r"] and not cfg["use_rslora"]  # scaling 1: B·A is the combined ΔW


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_with_the_same_random_stream(peft_model, adapters, tmp_path, method):
    """PEFT draws DARE's masks from torch's global RNG after injecting the new adapter (whose init draws
    too). A linear combination injects an identical adapter, so the RNG state after it is the state
    PEFT's DARE loop starts from; started from that state, ours must give PEFT's exact tensors."""
    names, weights = ["a", "b"], [1.0, 0.7]
    torch.manual_seed(1234)
    peft_model.add_weighted_adapter(names, weights, f"probe_{method}", combination_type="linear")
    state = torch.get_rng_state()
    torch.manual_seed(1234)
    peft_model.add_weighted_adapter(names, weights, f"dare_{method}", combination_type=method, density=0.5)
    expected = peft_combined(peft_model, f"dare_{method}")
    combine_adapters([adapters[n] for n in names], weights, tmp_path / "out", method=method, density=0.5,
                     rng_state=state)
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties_svd"])
def test_dare_is_reproducible_from_the_seed_and_leaves_the_callers_rng_alone(adapters, tmp_path, method):
    """The same seed gives the same adapter twice, another seed another one; torch's global RNG (which PEFT's
    random pruning draws from) is the caller's again afterwards."""
    names, weights = ["a", "b"], [1.0, 0.7]
    torch.manual_seed(99)
    before = torch.get_rng_state()
    for out, seed in (("s1", 3), ("s2", 3), ("s3", 4)):
        combine_adapters([adapters[n] for n in names], weights, tmp_path / out, method=method, density=0.5, seed=seed)
    assert torch.equal(torch.get_rng_state(), before)
    s1, s2, s3 = (load_file(str(tmp_path / s / "adapter_model.safetensors")) for s in ("s1", "s2", "s3"))
    assert s1.keys() == s3.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not any(torch.equal(s1[k], s3[k]) for k in s1)
    # the seed is what the recipe / --seed gives: the YAML form and the CLI pass it the same way
    assert json.loads((tmp_path / "s3" / "peftlab_combine.json").read_text())["seed"] == 4


def test_combined_adapter_loads_in_peftlab_and_peft_with_the_combined_delta(micro_dir, adapters, tmp_path):
    """cat is exact: the combined adapter's ΔW is Σ w_i·ΔW_i, in peftlab's layers and in PEFT's."""
    names, weights = ["a", "c"], [0.5, 2.0]
    combine_adapters([adapters[n] for n in names], weights, tmp_path / "cat", method="cat")
    ours = _base(micro_dir)
    load_adapter(ours, tmp_path / "cat")
    sources = {}
    for n in names:
        m = _base(micro_dir)
        load_adapter(m, adapters[n])
        sources[n] = {k: v.delta_weight() for k, v in lora_modules(m).items()}
    for module, layer in lora_modules(ours).items():
        expected = sum(w * sources[n].get(module, 0) for n, w in zip(names, weights))
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-5, atol=1e-6)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    pm = PeftModel.from_pretrained(_base(micro_dir), str(tmp_path / "cat")).eval()
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, ours.eval()(input_ids=ids).logits)


def test_cli_and_yaml_config(adapters, tmp_path, capsys):
    cfg = tmp_path / "combine.yaml"
    cfg.write_text(
        "method: ties\ndensity: 0.5\nseed: 1\nadapters:\n"
        f"  - {{path: {adapters['a']}, weight: 1.0}}\n  - {{path: {adapters['b']}, weight: 0.6}}\nout: from-yaml\n"
    )
    assert load_combine_config(cfg)["out_dir"] == str(tmp_path / "from-yaml")
    assert main(["merge", "--config", str(cfg)]) == 0
    assert main(["merge", "--adapters", str(adapters["a"]), str(adapters["b"]), "--weights", "1.0", "0.6",
                 "--method", "ties", "--density", "0.5", "--out", str(tmp_path / "from-cli")]) == 0
    a = load_file(str(tmp_path / "from-yaml" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "from-cli" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    provenance = json.loads((tmp_path / "from-cli" / "peftlab_combine.json").read_text())
    assert provenance["method"] == "ties" and provenance["weights"] == [1.0, 0.6]
    # user errors: one line, exit 2
    capsys.readouterr()
    assert main(["merge", "--adapters", str(adapters["a"]), str(adapters["c"]), "--weights", "1", "1",
                 "--method", "linear", "--out", str(tmp_path / "x")]) == 2
    assert "all adapters need one rank" in capsys.readouterr().err
    assert main(["merge", "--adapters", str(adapters["a"]), str(adapters["b"]), "--weights", "1",
                 "--out", str(tmp_path / "y")]) == 2
    assert "1 weight(s) for 2 adapter(s)" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"methd: ties\nadapters: [{adapters['a']}]\n")
    assert main(["merge", "--config", str(bad), "--out", str(tmp_path / "z")]) == 2
    assert "methd (did you mean method?)" in capsys.readouterr().err


def test_errors(adapters, micro_dir, tmp_path):
    with pytest.raises(PeftlabError, match="pass --density"):
        combine_adapters([adapters["a"], adapters["b"]], [1, 1], tmp_path / "o", method="ties")
    with pytest.raises(PeftlabError, match="use one of linear"):
        combine_adapters([adapters["a"], adapters["b"]], [1, 1], tmp_path / "o", method="average")
    dora = tmp_path / "dora"
    pm = get_peft_model(_base(micro_dir), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(dora)
    with pytest.raises(PeftlabError, match="DoRA adapter"):
        combine_adapters([dora, adapters["a"]], [1, 1], tmp_path / "o", method="svd")


def test_the_chat_template_carries_over_when_every_input_agrees(adapters, tmp_path):
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(adapters["a"], a)
    shutil.copytree(adapters["b"], b)
    for d in (a, b):
        (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    combine_adapters([a, b], [1.0, 0.5], tmp_path / "same", method="cat")
    assert (tmp_path / "same" / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"
    (b / "chat_template.jinja").write_text("{{ 'other' }}")
    combine_adapters([a, b], [1.0, 0.5], tmp_path / "differ", method="cat")
    assert not (tmp_path / "differ" / "chat_template.jinja").exists()
