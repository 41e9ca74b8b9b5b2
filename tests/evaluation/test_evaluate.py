"""Generation metrics: token F1 (SQuAD definition) and exact match of greedy answers to held-out prompts."""
from __future__ import annotations

import pytest
import torch

from peftlab.evaluation.evaluate import generation_metrics, token_f1


@pytest.mark.parametrize(("pred", "ref", "f1"), [
    ("Paris", "Paris", 1.0),
    ("Paris, France", "paris,", 2 * (1 / 2) * 1 / (1 / 2 + 1)),
    ("the cat sat", "the cat sat on the mat", 2 * 1 * 0.5 / 1.5),
    ("a a b", "a b b", 2 * (2 / 3) * (2 / 3) / (4 / 3)),
    ("", "", 1.0), ("x", "", 0.0), ("x y", "z", 0.0),
])
def test_token_f1(pred, ref, f1):
    assert token_f1(pred, ref) == pytest.approx(f1)


def test_generation_metrics_score_the_models_own_answers():
    from transformers import AutoModelForCausalLM

    from peftlab.model.builtin import build_tokenizer, resolve_builtin

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_builtin("builtin:micro-llama"), dtype=torch.float32).eval()
    prompts = [{"prompt_ids": tok("question one")["input_ids"], "reference": ""},
               {"prompt_ids": tok("another question")["input_ids"], "reference": ""}]
    # the reference set to the greedy answer itself: exact match and token F1 are 1
    full = generation_metrics(model, tok, prompts, max_new_tokens=6, batch_size=2, show=2)
    preds = [s["prediction"] for s in full["samples"]]
    same = [{**p, "reference": a} for p, a in zip(prompts, preds)]
    m = generation_metrics(model, tok, same, max_new_tokens=6, batch_size=2)
    assert m["exact_match"] == 1.0 and m["token_f1"] == 1.0
    # one reference with an extra word: exact match halves, token F1 gives partial credit
    partial = [same[0], {**same[1], "reference": preds[1] + " extra"}]
    m = generation_metrics(model, tok, partial, max_new_tokens=6, batch_size=2)
    assert m["exact_match"] == 0.5
    assert m["token_f1"] == pytest.approx((1.0 + token_f1(preds[1], preds[1] + " extra")) / 2)
    assert 0.5 < m["token_f1"] < 1.0
