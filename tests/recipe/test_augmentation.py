"""The ``augment:`` section: probabilities in [0, 1], at least one method on, and the runs it cannot serve
(streaming, packing, overlength split, offline distillation) refused with the key and the fix."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.recipe.augmentation import METHODS, AugmentConfig
from peftlab.recipe.parse import load_recipe, recipe_from_dict
from peftlab.recipe.schema import Recipe

DATA = {"train": ["train.jsonl"]}
REPO = Path(__file__).resolve().parents[2]


def _recipe(augment, **sections):
    return recipe_from_dict({"data": {**DATA, **sections.pop("data", {})}, "augment": augment, **sections},
                            source="r.yaml")


def test_a_valid_section_and_its_defaults():
    r = _recipe({"word_deletion": 0.1, "char_noise": 0.05})
    assert r.augment == AugmentConfig(word_deletion=0.1, char_noise=0.05)
    assert [getattr(r.augment, m) for m in METHODS] == [0.0, 0.0, 0.0, 0.1, 0.05]
    assert recipe_from_dict({"data": DATA}).augment is None  # off unless asked for


@pytest.mark.parametrize("augment, message", [
    ({"word_deletion": 1.5}, ("invalid recipe r.yaml:\n  augment.word_deletion: Input should be less than or equal "
                             "to 1 (got 1.5)")),
    ({"synonym": -0.1}, "augment.synonym: Input should be greater than or equal to 0 (got -0.1)"),
    ({"char_noise": "often"}, "augment.char_noise: Input should be a valid number"),
    ({"char_nosie": 0.1}, "augment.char_nosie: unknown key — did you mean 'augment.char_noise'?"),
    ({"word_swap": 0}, ("every probability is 0, so nothing would be augmented; give at least one method a "
                       "probability in (0, 1]")),
])
def test_bad_values_name_the_key(augment, message):
    with pytest.raises(PeftlabError) as e:
        _recipe(augment)
    assert message in str(e.value)


@pytest.mark.parametrize("sections, message", [
    ({"data": {"streaming": True}}, "augment with data.streaming: augmentation re-tokenizes each training row"),
    ({"data": {"packing": True}}, "augment with data.packing: an augmented row changes length"),
    ({"data": {"overlength": "split"}}, "augment with data.overlength: split"),
    ({"distill": {"teacher": "builtin:tiny-llama", "mode": "offline"}}, "augment with distill.mode: offline"),
])
def test_runs_augmentation_cannot_serve_are_refused_with_the_fix(sections, message):
    with pytest.raises(PeftlabError, match="remove augment") as e:
        _recipe({"word_swap": 0.1}, **sections)
    assert message in str(e.value)
    _recipe({"word_swap": 0.1}, distill={"teacher": "builtin:tiny-llama"})  # online distillation is fine


@pytest.mark.skipif("preference" not in Recipe.model_fields, reason="no preference section in this recipe schema")
def test_a_preference_run_is_refused():
    with pytest.raises(PeftlabError, match="augment with preference: the prompt a chosen and a rejected answer"):
        _recipe({"word_swap": 0.1}, preference={"method": "dpo"})


def test_the_shipped_quickstart_recipe_and_its_noisy_eval_data():
    recipe = load_recipe(REPO / "recipes" / "augment-quickstart.yaml")
    assert recipe.augment == AugmentConfig(char_noise=0.15) and recipe.task == "classification"
    spec = importlib.util.spec_from_file_location("make_augment_data", REPO / "recipes" / "make_augment_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    train, clean, noisy = gen.generate(8, 50, seed=0)
    assert len(train) == 8 and [r["label"] for r in clean] == [r["label"] for r in noisy]
    topic_words = {w for words in gen.TOPICS.values() for w in words}
    for c, n in zip(clean, noisy):
        word = next(w for w in c["text"].split() if w in topic_words)
        assert word not in n["text"].split() and len(n["text"].split()) <= len(c["text"].split())  # misspelt
    assert train == gen.generate(8, 50, seed=0)[0]  # the same data on every machine
