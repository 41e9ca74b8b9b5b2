"""peftlab.objectives.reference: the adapters-off forward is the base model's (and the adapters come back, also
after an error); sequence log-probs are the full-logits computation's; precomputed reference log-probs are kept
under a key, read back, and a resumed run without them is refused."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftlab.adapters.lora_inject import inject_lora, lora_modules
from peftlab.errors import PeftlabError
from peftlab.objectives.causal_lm import LossSettings
from peftlab.objectives.preference import REFERENCE_FILE, PreferenceObjective
from peftlab.objectives.reference import ReferenceCache, adapters_disabled, reference_logps, sequence_logps
from peftlab.recipe.preference_config import PreferenceConfig


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2)).eval()
    lora = copy.deepcopy(base)
    inject_lora(lora, r=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for m in lora_modules(lora).values():
            m.lora_B.weight.normal_()
    return base, lora.eval()


def batch(pairs: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2 * pairs, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[1, 7:] = -100  # a shorter answer
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pairs": torch.tensor(pairs),
            "sample_ids": torch.tensor([10 + k for k in range(pairs)])}


def naive(model, b):
    logits = model(input_ids=b["input_ids"]).logits[:, :-1].float()
    tgt = b["labels"][:, 1:]
    lp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return (lp * (tgt != -100)).sum(1)


def test_adapters_off_is_the_base_and_the_adapters_come_back(models):
    base, lora = models
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(reference_logps(lora, b, LossSettings(backend="torch")), naive(base, b))
        logps, n = sequence_logps(lora, b, LossSettings(backend="torch"))
        torch.testing.assert_close(logps, naive(lora, b))
    assert n.tolist() == [5, 3, 5, 5] and (logps - naive(base, b)).abs().max() > 1e-3
    with pytest.raises(RuntimeError), adapters_disabled(lora):
        assert all(m.kernel_backend == "off" for m in lora_modules(lora).values())
        raise RuntimeError("boom")
    assert all(m.kernel_backend == "auto" for m in lora_modules(lora).values())


def test_precomputed_reference_is_kept_read_back_and_required_on_resume(models, tmp_path):
    _, lora = models
    recipe = SimpleNamespace(output_dir=tmp_path, resume=None, checkpoint=SimpleNamespace(dir="checkpoints"),
                             train=SimpleNamespace(micro_batch_size=2), adapter=SimpleNamespace(init_from=None),
                             fingerprint=lambda *keys: "f")
    obj = PreferenceObjective(PreferenceConfig(reference="precomputed"), LossSettings(backend="torch"),
                              recipe=recipe, n_train=2, data_fingerprint="d")
    b = batch()
    obj.prepare(lora, lambda ix: b)
    with torch.no_grad():
        want = naive(lora, b)
    torch.testing.assert_close(obj.cache.lookup(b), want)
    key = obj.cache.key
    assert ReferenceCache.read(tmp_path / REFERENCE_FILE, key).values == obj.cache.values  # exact round trip
    assert ReferenceCache.read(tmp_path / REFERENCE_FILE, "other") is None
    resumed = PreferenceObjective(obj.config, obj.settings, recipe=recipe, n_train=2, data_fingerprint="d")
    resumed.prepare(lora, lambda ix: pytest.fail("a resumed run reads the file"))
    assert resumed.cache.values == obj.cache.values
    (tmp_path / REFERENCE_FILE).unlink()
    (tmp_path / "checkpoints" / "step-0000001").mkdir(parents=True)
    recipe.resume = "auto"
    with pytest.raises(PeftlabError, match="a resumed run cannot recompute them"):
        resumed.prepare(lora, lambda ix: b)
