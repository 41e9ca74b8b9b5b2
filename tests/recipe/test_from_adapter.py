"""Files from elsewhere never run code: an adapter's recipe cannot switch on remote code, pickle weights are
refused unread, corrupt weights end in one message (issue 16, items 5 and the bad-input list)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from peftlab.cli.main import main

pytestmark = pytest.mark.xdist_group("untrusted")

PAYLOAD_CONFIG = '''
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig


class PayloadConfig(LlamaConfig):
    model_type = "payload-llama"
'''

PAYLOAD_MODEL = '''
from transformers import LlamaForCausalLM

from .configuration_payload import PayloadConfig


class PayloadForCausalLM(LlamaForCausalLM):
    config_class = PayloadConfig
'''


@pytest.fixture()
def payload(tmp_path, micro_dir):
    """A base model whose repository ships Python (it writes a marker file when imported), and an adapter
    directory whose stored recipe asks for remote code."""
    from peftlab.adapters.lora_inject import inject_lora
    from peftlab.adapters.peft_format import save_adapter
    from peftlab.model.load import load_base_model

    marker = tmp_path / "PWNED"
    base = tmp_path / "base"
    shutil.copytree(micro_dir, base)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="payload-llama", architectures=["PayloadForCausalLM"],
                  auto_map={"AutoConfig": "configuration_payload.PayloadConfig",
                            "AutoModelForCausalLM": "modeling_payload.PayloadForCausalLM"})
    (base / "config.json").write_text(json.dumps(config))
    (base / "configuration_payload.py").write_text(PAYLOAD_CONFIG.format(marker=str(marker)))
    (base / "modeling_payload.py").write_text(PAYLOAD_MODEL)

    model = load_base_model(str(micro_dir), dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(base))
    recipe = {"model": {"name": str(base), "trust_remote_code": True}, "quantization": {"mode": "none"},
              "data": {"train": [{"path": str(tmp_path / "unused.jsonl")}],
                       "eval": [{"path": str(tmp_path / "eval.jsonl")}]}}
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "2 + 2 =", "completion": " 4"}) + "\n")
    (adapter / "peftlab_recipe.yaml").write_text(yaml.safe_dump(recipe))
    return adapter, marker, tmp_path


@pytest.mark.parametrize("command", ["eval", "generate", "predict"])
def test_an_adapter_recipe_never_turns_on_remote_code(payload, command, capsys):
    adapter, marker, tmp = payload
    argv = {"eval": ["eval", str(adapter)],
            "generate": ["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"],
            "predict": ["predict", str(adapter), "--input", str(tmp / "eval.jsonl"), "--output", str(tmp / "p.jsonl")],
            }[command]
    if command == "predict":  # a classification adapter dir: head files beside the LoRA files
        (adapter / "classifier_config.json").write_text(json.dumps(
            {"task": "classification", "labels": ["a", "b"], "pooling": "last", "hidden_size": 128,
             "num_outputs": 2}))
    assert main(argv) == 2
    assert not marker.exists(), "the adapter's recipe made the base repository's Python run"
    err = capsys.readouterr().err
    assert "payload-llama" in err or "remote code" in err or "trust_remote_code" in err
    assert "asks for remote code" in err and "--trust-remote-code" in err  # the stored request, named and ignored


def test_remote_code_runs_when_the_user_asks(payload, capsys):
    """The same payload runs with --trust-remote-code: the test above can fail."""
    adapter, marker, _ = payload
    main(["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code"])
    assert marker.exists()


def test_pickle_adapter_weights_are_refused_unread(tmp_path, micro_dir, monkeypatch, capsys):
    from peftlab.adapters.lora_inject import inject_lora
    from peftlab.adapters.peft_format import save_adapter
    from peftlab.model.load import load_base_model

    model = load_base_model(str(micro_dir), dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, r=4, alpha=8, target_modules=["q_proj"])
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(micro_dir))
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "x"))

    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": Payload()}))

    def no_unpickling(*a, **k):
        raise AssertionError("peftlab unpickled an adapter file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.bin" in err and "pickle" in err and "safetensors" in err
    assert not marker.exists()


def test_a_model_with_only_pickle_weights_is_refused(tmp_path, micro_dir, monkeypatch, capsys):
    base = tmp_path / "base"
    shutil.copytree(micro_dir, base)
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("peftlab unpickled a model checkpoint"))
    assert main(["generate", "--model", str(base), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "pickle" in err and "safe_serialization=True" in err


def test_corrupt_adapter_weights_end_in_one_message(tmp_path, micro_dir, capsys):
    from peftlab.adapters.lora_inject import inject_lora
    from peftlab.adapters.peft_format import save_adapter
    from peftlab.model.load import load_base_model

    model = load_base_model(str(micro_dir), dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, r=4, alpha=8, target_modules=["q_proj"])
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(micro_dir))
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    for variant in (data[: len(data) // 2], b"\x00" * 64, b"garbage"):
        weights.write_bytes(variant)
        assert main(["generate", "--adapter", str(adapter), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert "adapter_model.safetensors" in err and "corrupt" in err, err


# ---- the recipes eval / generate / merge rebuild a model from (no model is loaded) ----


def _peft_dir(path: Path, base: str | None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": base}))
    return path


def test_a_plain_peft_adapter_gets_an_unquantised_recipe_of_its_base(tmp_path, monkeypatch):
    from peftlab.recipe.from_adapter import INFERENCE_ONLY_DATA, recipe_for_adapter

    adapter = _peft_dir(tmp_path / "peft", "org/base-7b")
    r = recipe_for_adapter(adapter, ["train.seed=3"])
    assert (r.model.name, r.quantization.mode, r.model.trust_remote_code, r.train.seed) == ("org/base-7b", "none",
                                                                                          False, 3)
    assert [s.path for s in r.data.train] == [INFERENCE_ONLY_DATA]
    assert recipe_for_adapter(adapter, model="builtin:micro-llama").model.name == "builtin:micro-llama"
    # --data: the files, resolved from the working directory, are the eval data and nothing is held out
    monkeypatch.chdir(tmp_path)
    r = recipe_for_adapter(adapter, data=["held.jsonl"])
    assert [s.path for s in r.data.eval] == [str(tmp_path / "held.jsonl")] == [s.path for s in r.data.train]
    assert r.data.eval_split == 0.0


def test_an_adapter_without_a_base_or_a_config_is_refused(tmp_path):
    from peftlab.errors import PeftlabError
    from peftlab.recipe.from_adapter import load_adapter_recipe, recipe_for_adapter

    with pytest.raises(PeftlabError, match=r"names no base model \(base_model_name_or_path\); pass --model"):
        recipe_for_adapter(_peft_dir(tmp_path / "nameless", None))
    with pytest.raises(PeftlabError, match="adapter_config.json is missing"):
        recipe_for_adapter(tmp_path)
    with pytest.raises(PeftlabError, match="has no peftlab_recipe.yaml"):
        load_adapter_recipe(tmp_path)
    (tmp_path / "peftlab_recipe.yaml").write_text("model: [unclosed")
    with pytest.raises(PeftlabError, match="(?s)is not valid YAML .*re-save the adapter or pass a recipe"):
        load_adapter_recipe(tmp_path)


def test_a_stored_recipe_is_read_with_remote_code_off(tmp_path, caplog):
    from peftlab.recipe.from_adapter import load_adapter_recipe, recipe_for_adapter

    stored = {"model": {"name": "builtin:micro-llama", "trust_remote_code": True}, "train": {"lr": 1e-3},
              "distill": {"teacher": {"name": "builtin:tiny-llama", "trust_remote_code": True}},
              "data": {"train": ["train.jsonl"]}}
    (tmp_path / "peftlab_recipe.yaml").write_text(yaml.safe_dump(stored))
    with caplog.at_level("WARNING", logger="peftlab"):
        r = load_adapter_recipe(tmp_path)
    assert (r.model.trust_remote_code, r.distill.teacher.trust_remote_code, r.train.lr) == (False, False, 1e-3)
    assert "model.trust_remote_code, distill.teacher.trust_remote_code" in caplog.text
    assert r.resolve_path("train.jsonl") == tmp_path.resolve() / "train.jsonl"  # relative to the adapter dir
    assert load_adapter_recipe(tmp_path, trust_remote_code=True).model.trust_remote_code is True
    assert recipe_for_adapter(tmp_path, model="builtin:tiny-llama").model.name == "builtin:tiny-llama"


def test_a_base_model_alone():
    from peftlab.recipe.from_adapter import base_model_recipe

    r = base_model_recipe("builtin:micro-llama", ["model.dtype=float32"])
    assert (r.model.name, r.quantization.mode, r.model.dtype) == ("builtin:micro-llama", "none", "float32")
