"""peftlab.export.hub: the model card says what the export is (base, recipe, data, metrics, fidelity), it is
written beside the export before any upload, and a failed or impossible upload names where the files are."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from peftlab.adapters.lora_inject import inject_lora
from peftlab.adapters.peft_format import save_adapter
from peftlab.cli.main import main
from peftlab.errors import PeftlabError
from peftlab.export.hub import model_card, push_to_hub

RECIPE = {
    "model": {"name": "builtin:micro-llama"},
    "quantization": {"mode": "nf4"},
    "adapter": {"r": 8, "alpha": 16, "target_modules": "all-linear", "dora": True},
    "data": {"train": [{"path": "train.jsonl"}], "eval": [{"hf": "org/eval-set"}]},
    "train": {"lr": 0.0002, "epochs": 1, "max_steps": 10, "micro_batch_size": 4, "grad_accum": 2, "seed": 7},
}


@pytest.fixture(scope="module")
def adapter(micro_dir, tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    inject_lora(model, r=2, alpha=4, target_modules=["v_proj"])
    out = tmp_path_factory.mktemp("run") / "adapter"
    save_adapter(model, out, base_model_name_or_path="builtin:micro-llama")
    return out


def test_model_card_has_base_recipe_data_metrics_and_fidelity(tmp_path):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "peftlab_recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"eval_after": {"loss": 1.23456, "steps": 10}}))
    report = {"samples_source": "built-in prompts", "max_abs_logit_diff": 1.5e-6, "top1_agreement": 1.0}
    card = model_card(title="me/model", base=None, kind="merged model", adapter_dir=adapter, report=report,
                      extra={"Note": "hello"})
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"library_name": "transformers", "tags": ["peftlab", "lora"], "base_model": "builtin:micro-llama"}
    assert "# me/model" in card and "base quantised to NF4 during training" in card
    assert "- **Adapter:** r=8, alpha=16, targets=all-linear, DoRA" in card
    assert "- **Training data:** ['train.jsonl']" in card and "- **Eval data:** ['org/eval-set']" in card
    assert "lr=0.0002, epochs=1, max_steps=10, micro_batch_size=4, grad_accum=2, seed=7" in card
    assert "| loss | 1.235 |" in card and "| steps | 10 |" in card
    assert "| max_abs_logit_diff | 1.5e-06 |" in card and "| samples_source | built-in prompts |" in card
    assert "- **Note:** hello" in card
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == RECIPE


def test_model_card_of_a_plain_peft_adapter_names_its_base(adapter):
    card = model_card(title="me/a", base=None, kind="adapter", adapter_dir=adapter)
    assert "library_name: peft" in card and "base_model: builtin:micro-llama" in card
    assert "## Recipe" not in card and "## Metrics" not in card


def test_push_without_network_keeps_the_card_beside_the_export(tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    with pytest.raises(PeftlabError, match=r"--push-to-hub me/m: no network \(HF_HUB_OFFLINE=1\), nothing was "
                                           r"uploaded; the export and its model card are in .*merged; upload them "
                                           r"later with `huggingface-cli upload me/m .*merged`"):
        push_to_hub(folder, "me/m", "card\n")
    assert (folder / "README.md").read_text() == "card\n"
    single = tmp_path / "model.gguf"
    single.write_bytes(b"GGUF")
    with pytest.raises(PeftlabError, match=r"and .*model\.README\.md"):
        push_to_hub(single, "me/g", "gguf card\n")
    assert (tmp_path / "model.README.md").read_text() == "gguf card\n"


def test_push_uploads_the_folder_with_its_card(tmp_path, monkeypatch):
    """The upload goes through huggingface_hub's HfApi (replaced here by a recorder: no network)."""
    import huggingface_hub

    calls = []

    class Api:
        def create_repo(self, repo, exist_ok):
            calls.append(("create", repo, exist_ok))

        def upload_folder(self, folder_path, repo_id):
            calls.append(("folder", sorted(p.name for p in Path(folder_path).iterdir()), repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    assert push_to_hub(folder, "me/a", "card\n") == "https://huggingface.co/me/a"
    assert calls == [("create", "me/a", True), ("folder", ["README.md", "adapter_model.safetensors"], "me/a")]


def test_cli_safetensors_export_and_push_to_hub_without_network(adapter, tmp_path, capsys):
    out = tmp_path / "st"
    assert main(["export", "--format", "safetensors", "--adapter", str(adapter), "--out", str(out),
                 "--dtype", "bf16", "--push-to-hub", "me/merged"]) == 2
    err = capsys.readouterr().err
    assert "no network (HF_HUB_OFFLINE=1), nothing was uploaded" in err and "huggingface-cli upload me/merged" in err
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # the work is kept
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: builtin:micro-llama" in card and "max_abs_logit_diff" in card
