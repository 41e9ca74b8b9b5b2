"""peftlab.export.peft: an adapter exported for PEFT / vLLM round-trips through PEFT and peftlab with identical
logits; an adapter whose config or base does not fit its weights is refused; the files are the PEFT format's."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model

from peftlab.adapters.lora_inject import inject_lora
from peftlab.adapters.peft_format import load_adapter, save_adapter
from peftlab.errors import PeftlabError
from peftlab.export.peft import export_peft
from peftlab.model.builtin import resolve_builtin


def test_peft_export_round_trips_through_peft_and_peftlab(micro_dir, tmp_path):
    """A PEFT-trained adapter exported by peftlab loads in PEFT and in peftlab with identical logits, and
    a peftlab adapter loads in PEFT with the logits of peftlab's own layers."""
    base = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32).eval()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                        use_dora=True, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(tmp_path / "peft")
    result = export_peft(tmp_path / "peft", tmp_path / "exported", base=str(micro_dir))
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()
    assert any("fit" in n for n in result.notes) and any("DoRA" in n for n in result.notes)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm.eval()(input_ids=ids).logits
        via_peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "exported")).eval()
        ours = copy.deepcopy(base)
        load_adapter(ours, tmp_path / "exported")
        assert torch.equal(via_peft(input_ids=ids).logits, want)
        assert torch.equal(ours.eval()(input_ids=ids).logits, want)
        # and back: peftlab's own adapter, exported, in PEFT
        save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(micro_dir))
        export_peft(tmp_path / "ours", tmp_path / "ours-exported")
        again = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours-exported")).eval()
        assert torch.equal(again(input_ids=ids).logits, want)


def test_peft_export_rejects_adapters_that_do_not_fit(micro_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    inject_lora(model, r=4, alpha=8, target_modules=["v_proj"])
    save_adapter(model, tmp_path / "a", base_model_name_or_path=str(micro_dir))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg | {"r": 8}))
    with pytest.raises(PeftlabError, match="has rank 4 but adapter_config.json says 8"):
        export_peft(tmp_path / "a", tmp_path / "o")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    tiny = resolve_builtin("builtin:tiny-llama")  # hidden 256: the micro adapter (hidden 128) does not fit
    with pytest.raises(PeftlabError, match=r"maps 128 -> 64 features but .* has 256 -> 128; wrong base model"):
        export_peft(tmp_path / "a", tmp_path / "o", base=str(tiny))


def test_peft_export_copies_recipe_template_and_provenance_and_refuses_a_full_out(micro_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(micro_dir, dtype=torch.float32)
    inject_lora(model, r=2, alpha=2, target_modules=["q_proj"])
    src = tmp_path / "a"
    save_adapter(model, src, base_model_name_or_path=str(micro_dir))
    (src / "peftlab_recipe.yaml").write_text("model: {name: x}\n")
    (src / "peftlab_combine.json").write_text('{"method": "cat"}\n')
    (src / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    result = export_peft(src, tmp_path / "o")
    assert result.modules == 2 and result.path == tmp_path / "o"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "peftlab_combine.json",
        "peftlab_recipe.yaml"]
    assert (tmp_path / "o" / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()
    assert (tmp_path / "o" / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    with pytest.raises(PeftlabError, match=r"--out .* exists and is not empty; .* --overwrite"):
        export_peft(src, tmp_path / "o")
    export_peft(src, tmp_path / "o", overwrite=True)
    assert not any(p.name.startswith(".") for p in (tmp_path / "o").iterdir())  # no temporary files left
