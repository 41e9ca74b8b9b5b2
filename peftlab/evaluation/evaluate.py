"""Evaluation: held-out loss / perplexity, and exact match of generated answers.

Exact match compares the greedy continuation of each held-out prompt with its reference answer
after whitespace normalisation; it is the quickstart's metric because it moves visibly when a
model learns a task (loss alone hides whether answers are right).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

from torch import nn

from peftlab.evaluation.generate import generate_ids
from peftlab.objectives.causal_lm import LossSettings, eval_loss


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1: overlap of the (lower-cased, whitespace-split) token bags of the two answers.

    Partial credit where exact match gives none ("Paris, France" vs "Paris": 0.67); two empty answers
    score 1, one empty answer 0.
    """
    pred, ref = normalise_answer(prediction).lower().split(), normalise_answer(reference).lower().split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(model: nn.Module, tokenizer: Any, prompts: list[dict], *, max_new_tokens: int,
                       batch_size: int, show: int = 0) -> dict[str, Any]:
    """Greedy answers to held-out prompts scored against their references: exact_match, token_f1, samples."""
    if not prompts:
        return {}
    outs = generate_ids(model, tokenizer, [p["prompt_ids"] for p in prompts], max_new_tokens=max_new_tokens,
                        batch_size=batch_size)
    preds = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outs]
    refs = [p["reference"] for p in prompts]
    samples = [{"prompt": tokenizer.decode(p["prompt_ids"], skip_special_tokens=True), "reference": r,
                "prediction": pred} for p, r, pred in zip(prompts[:show], refs, preds)]
    return {"exact_match": sum(normalise_answer(a) == normalise_answer(b) for a, b in zip(preds, refs)) / len(refs),
            "token_f1": sum(token_f1(a, b) for a, b in zip(preds, refs)) / len(refs), "samples": samples}


def evaluate(model: nn.Module, tokenizer: Any, eval_batches, eval_prompts: list[dict], *, recipe: Any,
             settings: LossSettings) -> dict[str, Any]:
    """All eval metrics of a recipe: loss and perplexity (whenever there is eval data), and exact match and
    token F1 of generated answers (when the held-out data has references and eval.metric asks for them)."""
    metrics: dict[str, Any] = {}
    if eval_batches is not None:
        loss, n = eval_loss(model, eval_batches, settings=settings)
        if n:
            metrics["eval_loss"] = loss
            metrics["perplexity"] = math.exp(min(loss, 50.0))
            metrics["eval_tokens"] = n
    if recipe.eval.metric in ("exact_match", "token_f1") and eval_prompts:
        prompts = eval_prompts[: recipe.eval.max_prompts]
        metrics.update(generation_metrics(model, tokenizer, prompts, max_new_tokens=recipe.eval.max_new_tokens,
                                          batch_size=recipe.eval.batch_size, show=recipe.eval.show_samples))
    return metrics
