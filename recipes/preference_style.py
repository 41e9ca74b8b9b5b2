#!/usr/bin/env python3
"""How far a preference run moved the greedy answers toward the chosen ones: the style rate on held-out prompts.

For a preference recipe (recipes/dpo-quickstart.yaml, kto-quickstart.yaml on ``make_preference_data.py --preference
style`` data) this generates the greedy answer to each held-out prompt (the recipe's ``data.eval`` pairs, at most
``eval.max_prompts``; ``eval.max_new_tokens`` tokens) and reports, as one JSON object:

- ``style_rate``: the share of answers in the chosen style: one value (a number or a letter) between the chosen
  answers' common prefix and common suffix (``make_preference_data.py --preference style``: ``7.``, the suffix
  ``.``; a bare ``7`` or noise like ``o..s.`` is not);
- ``exact_match``: answers equal to the chosen answer (as ``peftlab eval`` scores them);
- ``starts_with_chosen``: answers that begin with the chosen answer (``7.`` and ``7....``: the right value in the
  chosen style, whether or not the model then stops);
- ``answer_match``: answers whose value is right in either style (``7``, ``7.``): the skill the SFT
  quickstart taught, which a style preference should leave intact;
- a few ``samples``.

``--before`` scores the model the run starts from (the base + ``adapter.init_from``, or the base alone: a fresh
LoRA adapter changes nothing); without it, the run's trained adapter (``output.dir/adapter``), or ``--adapter DIR``.

    python recipes/preference_style.py recipes/dpo-quickstart.yaml --before
    python recipes/preference_style.py recipes/dpo-quickstart.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any


def chosen_style(references: list[str]) -> tuple[str, str]:
    """The chosen answers' style: their longest common prefix and suffix (``7.`` ``b.`` -> ``("", ".")``).
    References without one are refused: such data has no style to count."""
    prefix = os.path.commonprefix(references)
    suffix = os.path.commonprefix([r[::-1] for r in references])[::-1]
    if not (prefix + suffix).strip():
        raise ValueError("the chosen answers share no prefix or suffix: this data has no style to count "
                         "(make it with make_preference_data.py --preference style)")
    return prefix, suffix


def bare(answer: str, prefix: str, suffix: str) -> str:
    """The answer's value without the chosen style: ``7.`` -> ``7`` (``7`` stays ``7``)."""
    if answer.startswith(prefix) and answer.endswith(suffix) and len(answer) > len(prefix) + len(suffix):
        return answer[len(prefix):len(answer) - len(suffix)]
    return answer


def in_style(answer: str, prefix: str, suffix: str) -> bool:
    """The answer is one quickstart value (a number or a letter) wrapped in the chosen style (``7.``; not ``7``,
    not ``o..s.``)."""
    value = bare(answer, prefix, suffix)
    return value != answer and re.fullmatch(r"-?\w+", value) is not None


def style_figures(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """style_rate / exact_match / answer_match of greedy answers against the chosen answers (see the module doc),
    after whitespace normalisation (as ``peftlab eval`` compares answers)."""
    if not references or len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    preds = [" ".join(p.split()) for p in predictions]
    refs = [" ".join(r.split()) for r in references]
    prefix, suffix = chosen_style(refs)
    n = len(refs)
    return {"prefix": prefix, "suffix": suffix, "prompts": n,
            "style_rate": sum(in_style(p, prefix, suffix) for p in preds) / n,
            "exact_match": sum(p == r for p, r in zip(preds, refs)) / n,
            "starts_with_chosen": sum(p.startswith(r) for p, r in zip(preds, refs)) / n,
            "answer_match": sum(bare(p, prefix, suffix) == bare(r, prefix, suffix) for p, r in zip(preds, refs)) / n}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--before", action="store_true", help="the model the run starts from")
    which.add_argument("--adapter", type=Path, help="this adapter dir instead of output.dir/adapter")
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args(argv)

    from peftlab.data.pipeline import build_data
    from peftlab.evaluation.generate import generate_ids
    from peftlab.model.load import build_model
    from peftlab.recipe.parse import load_recipe

    recipe = load_recipe(args.recipe)
    adapter = None if args.before else (args.adapter or recipe.output_dir / "adapter")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise SystemExit(f"no adapter at {adapter}: train first (peftlab train {args.recipe}) or pass --before")
    loaded = build_model(recipe, adapter_dir=adapter, trainable=False)
    loaded.model.eval()
    data = build_data(recipe.data, loaded.tokenizer, seed=recipe.train.seed, base_dir=Path(recipe.base_dir))
    prompts = data.eval_prompts[: recipe.eval.max_prompts]
    outs = generate_ids(loaded.model, loaded.tokenizer, [p["prompt_ids"] for p in prompts],
                        max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size)
    preds = [loaded.tokenizer.decode(ids, skip_special_tokens=True) for ids in outs]
    refs = [p["reference"] for p in prompts]
    figures = style_figures(preds, refs)
    figures["model"] = "start" if args.before else str(adapter)
    figures["samples"] = [{"prompt": loaded.tokenizer.decode(p["prompt_ids"], skip_special_tokens=True)[-40:],
                           "chosen": r, "greedy": g} for p, r, g in zip(prompts, refs, preds)][: args.samples]
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
