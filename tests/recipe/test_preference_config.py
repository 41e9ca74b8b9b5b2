"""peftlab.recipe.preference_config: TRL's names and defaults, the data section marked as preference data, and one clear
message for each combination that cannot work."""
from __future__ import annotations

import pytest

from peftlab.errors import PeftlabError
from peftlab.recipe.parse import recipe_from_dict
from peftlab.recipe.preference_config import PreferenceConfig


def recipe(**sections):
    raw = {"data": {"train": ["pairs.jsonl"]}, "preference": {}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe_from_dict(raw)


def test_defaults_are_trls_and_the_data_is_read_as_pairs_or_unpaired():
    c = PreferenceConfig()
    assert (c.method, c.beta, c.label_smoothing, c.simpo_gamma, c.desirable_weight, c.undesirable_weight,
            c.reference) == ("dpo", 0.1, 0.0, 0.5, 1.0, 1.0, "adapters_off")
    assert recipe().data.preference == {"mode": "pairs", "max_prompt_len": None}
    assert recipe(preference={"method": "kto"}).data.preference["mode"] == "unpaired"
    assert recipe_from_dict({"data": {"train": ["a.jsonl"]}}).data.preference is None
    assert "preference" not in recipe().to_dict()["data"]  # derived, never a key of its own
    assert not PreferenceConfig(method="simpo").needs_reference and PreferenceConfig(method="ipo").needs_reference


@pytest.mark.parametrize("sections,message", [
    ({"task": "classification"}, "preference with task=classification"),
    ({"distill": {"teacher": {"name": "builtin:tiny-llama"}}}, "preference with distill"),
    ({"data": {"train": ["p.jsonl"], "packing": True}}, "preference with data.packing: true"),
    ({"data": {"train": ["p.jsonl"], "streaming": True}}, "preference with data.streaming: true"),
    ({"data": {"train": ["p.jsonl"], "overlength": "split"}}, "preference with data.overlength: split"),
    ({"preference": {"method": "kto", "reference": "precomputed"}}, "method=kto with reference=precomputed"),
    ({"preference": {"method": "ipo", "label_smoothing": 0.1}}, "label_smoothing has no meaning for method=ipo"),
    ({"preference": {"method": "robust", "label_smoothing": 0.5}}, "method=robust needs label_smoothing < 0.5"),
    ({"preference": {"max_prompt_len": 1024}}, "preference.max_prompt_len=1024 leaves no room"),
    ({"preference": {"method": "orpo", "sft_weight": 0.5}}, "sft_weight with method=orpo"),
    ({"train": {"loss": {"z_loss": 1e-4}}}, "preference with train.loss.label_smoothing/z_loss"),
    ({"adapter": {"unfreeze": ["embeddings"]}}, "preference with adapter.unfreeze"),
])
def test_combinations_that_cannot_work_are_refused_by_name(sections, message):
    with pytest.raises(PeftlabError, match=message.replace(".", r"\.").replace("(", r"\(")):
        recipe(**sections)
