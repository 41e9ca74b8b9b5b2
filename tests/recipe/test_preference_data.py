"""recipes/make_preference_data.py (the preference quickstarts' data) and recipes/preference_style.py (the style
rate their headers report)."""
from __future__ import annotations

import importlib.util
import json
import random

import pytest
from helpers import REPO


def recipe_module(name: str):
    import sys

    sys.path.insert(0, str(REPO / "recipes"))  # make_preference_data imports make_quickstart_data
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_style_data_prefers_the_sentence_to_the_bare_answer_and_keeps_the_quickstart_split(tmp_path):
    gen = recipe_module("make_preference_data")
    gen.main(["--out", str(tmp_path), "--train", "200", "--eval", "40"])  # --preference style is the default
    train, held = read(tmp_path / "preference" / "train.jsonl"), read(tmp_path / "preference" / "eval.jsonl")
    assert len(train) == 200 and len(held) == 40
    for row in train + held:
        answer = row["rejected"][0]["content"]
        assert row["chosen"][0]["content"] == f"{answer}."
        assert " " not in answer.strip("-")  # the bare answer: one number or letter, the SFT model's style
    assert {r["prompt"][0]["content"] for r in train}.isdisjoint(r["prompt"][0]["content"] for r in held)
    # the quickstart's own answers: the same generator, the same seed
    qs_train, _ = recipe_module("make_quickstart_data").generate(200, 40, 1234)
    assert [r["rejected"][0]["content"] for r in train] == [ex["messages"][1]["content"] for ex in qs_train]

    kto = read(tmp_path / "kto" / "train.jsonl")
    assert len(kto) == 200 and 60 < sum(r["label"] for r in kto) < 140
    for r in kto:
        assert r["completion"][0]["content"].endswith(".") == r["label"]
    assert read(tmp_path / "kto" / "eval.jsonl") == held  # KTO's eval is pairs (rewards/accuracies)


@pytest.mark.parametrize("kind", ["copied", "near"])
def test_correct_data_prefers_the_right_answer_to_a_wrong_one(tmp_path, kind):
    gen = recipe_module("make_preference_data")
    gen.main(["--out", str(tmp_path), "--train", "100", "--eval", "20", "--preference", "correct",
              "--rejected", kind])
    qs_train, _ = recipe_module("make_quickstart_data").generate(100, 20, 1234)
    rows = read(tmp_path / "preference" / "train.jsonl")
    assert [r["chosen"][0]["content"] for r in rows] == [ex["messages"][1]["content"] for ex in qs_train]
    assert all(r["rejected"][0]["content"] != r["chosen"][0]["content"] for r in rows)
    with pytest.raises(ValueError, match="preference must be one of"):
        gen.to_pair(qs_train[0], random.Random(0), preference="polite")


def test_style_figures_count_the_chosen_style_exact_and_right_answers():
    fig = recipe_module("preference_style").style_figures(
        ["7.", "4.", "7", " b. ", "o..s.", "", "-3."],
        ["7.", "5.", "7.", "b.", "c.", "d.", "-3."])
    assert (fig["prefix"], fig["suffix"]) == ("", ".")
    assert fig["style_rate"] == pytest.approx(4 / 7)  # one value in the style; not '7', noise or nothing
    assert fig["exact_match"] == pytest.approx(3 / 7)  # whitespace normalised, as peftlab eval does
    assert fig["starts_with_chosen"] == pytest.approx(3 / 7)
    assert recipe_module("preference_style").style_figures(["7....", "7."], ["7.", "7."])["starts_with_chosen"] == 1
    assert fig["answer_match"] == pytest.approx(4 / 7)  # '7' is right in the terse style too
    sentence = recipe_module("preference_style").style_figures(["The answer is 7.", "7", "The answer is 9."],
                                                               ["The answer is 7.", "The answer is 7.",
                                                                "The answer is 8."])
    assert sentence["prefix"] == "The answer is " and sentence["style_rate"] == pytest.approx(2 / 3)
    assert sentence["answer_match"] == pytest.approx(2 / 3)


def test_style_figures_refuse_answers_without_a_common_style():
    with pytest.raises(ValueError, match="no prefix or suffix"):
        recipe_module("preference_style").style_figures(["7", "b"], ["7", "b"])
