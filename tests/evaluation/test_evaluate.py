"""Generation metrics: token F1 (SQuAD definition) and exact match of greedy answers to held-out prompts."""
from __future__ import annotations

import math

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


def test_evaluate_reports_the_held_out_loss_and_the_answers_the_recipe_asks_for(tmp_path):
    """eval_loss is the token mean of the next-token cross-entropy over every held-out target (checked against
    torch's own cross-entropy on the model's logits); generated-answer metrics only when eval.metric asks."""
    from helpers import make_quickstart_data, tiny_recipe_dict
    from torch.nn import functional as F

    from peftlab.data.collate import collate
    from peftlab.data.pipeline import build_data
    from peftlab.evaluation.evaluate import evaluate
    from peftlab.model.load import build_model
    from peftlab.objectives.causal_lm import LossSettings
    from peftlab.recipe.parse import recipe_from_dict

    data_dir = make_quickstart_data(tmp_path / "data", n_train=8, n_eval=6)
    raw = tiny_recipe_dict(data_dir, tmp_path / "out", quantization={"mode": "none"},
                           eval={"metric": "loss", "max_prompts": 3, "max_new_tokens": 3, "show_samples": 2})
    recipe = recipe_from_dict(raw)
    loaded = build_model(recipe, trainable=False)
    data = build_data(recipe.data, loaded.tokenizer, seed=0)
    batches = [collate(data.eval[i:i + 4], pad_token_id=data.pad_token_id) for i in range(0, len(data.eval), 4)]
    for b in batches:
        b.pop("loss_weights", None)
    settings = LossSettings.from_recipe(recipe, loaded.model)
    metrics = evaluate(loaded.model, loaded.tokenizer, batches, data.eval_prompts, recipe=recipe, settings=settings)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = loaded.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            n += int((labels != -100).sum())
    assert set(metrics) == {"eval_loss", "perplexity", "eval_tokens"}  # eval.metric: loss generates nothing
    assert metrics["eval_tokens"] == n
    assert metrics["eval_loss"] == pytest.approx(total / n, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    recipe.eval.metric = "exact_match"
    answered = evaluate(loaded.model, loaded.tokenizer, None, data.eval_prompts, recipe=recipe, settings=settings)
    assert set(answered) == {"exact_match", "token_f1", "samples"} and len(answered["samples"]) == 2
    assert answered == generation_metrics(loaded.model, loaded.tokenizer, data.eval_prompts[:3], max_new_tokens=3,
                                          batch_size=recipe.eval.batch_size, show=2)
