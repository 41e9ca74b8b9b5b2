"""Evaluation: held-out loss / perplexity, and exact match of generated answers.

Exact match compares the greedy continuation of each held-out prompt with its reference answer
after whitespace normalisation; it is the quickstart's metric because it moves visibly when a
model learns a task (loss alone hides whether answers are right).
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from peftlab.generate import generate_ids
from peftlab.loss import LossSettings, eval_loss


def normalise_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(model: nn.Module, tokenizer: Any, prompts: list[dict], *, max_new_tokens: int, batch_size: int,
                show: int = 0) -> tuple[float, list[dict]]:
    """(accuracy, the first ``show`` samples as {prompt, reference, prediction})."""
    if not prompts:
        return float("nan"), []
    outs = generate_ids(model, tokenizer, [p["prompt_ids"] for p in prompts], max_new_tokens=max_new_tokens,
                        batch_size=batch_size)
    hits = 0
    samples = []
    for p, ids in zip(prompts, outs):
        pred = tokenizer.decode(ids, skip_special_tokens=True)
        hits += normalise_answer(pred) == normalise_answer(p["reference"])
        if len(samples) < show:
            samples.append({"prompt": tokenizer.decode(p["prompt_ids"], skip_special_tokens=True),
                            "reference": p["reference"], "prediction": pred})
    return hits / len(prompts), samples


def evaluate(model: nn.Module, tokenizer: Any, eval_batches, eval_prompts: list[dict], *, recipe: Any,
             settings: LossSettings) -> dict[str, Any]:
    """All eval metrics of a recipe: loss and perplexity (when there is eval data) and exact match."""
    metrics: dict[str, Any] = {}
    if eval_batches is not None:
        loss, n = eval_loss(model, eval_batches, settings=settings)
        if n:
            metrics["eval_loss"] = loss
            metrics["perplexity"] = math.exp(min(loss, 50.0))
            metrics["eval_tokens"] = n
    if recipe.eval.metric == "exact_match" and eval_prompts:
        prompts = eval_prompts[: recipe.eval.max_prompts]
        acc, samples = exact_match(model, tokenizer, prompts, max_new_tokens=recipe.eval.max_new_tokens,
                                   batch_size=recipe.eval.batch_size, show=recipe.eval.show_samples)
        metrics["exact_match"] = acc
        metrics["samples"] = samples
    return metrics
