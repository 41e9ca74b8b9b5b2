"""``peftlab eval | generate | predict``: a trained adapter (peftlab or plain PEFT, see
:mod:`peftlab.recipe.from_adapter`) or a base model put to use. What they print on stdout is their product
(eval's JSON, the generations, predict's summary); their messages go to stderr so that stdout can be piped.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import PeftlabError

if TYPE_CHECKING:  # the recipe imports pydantic and the data package (torch): commands import what they run
    from peftlab.recipe.schema import Recipe

logger = logging.getLogger(__name__)


def _adapter_recipe(args: argparse.Namespace, path: Path) -> Recipe:
    """The recipe that rebuilds an adapter directory's model (its stored recipe read as untrusted input, or
    one made from a plain PEFT adapter's config), with the CLI's --set / --model / --data applied."""
    from peftlab.recipe.from_adapter import recipe_for_adapter

    return recipe_for_adapter(path, args.set, model=getattr(args, "model", None),
                              trust_remote_code=args.trust_remote_code, data=getattr(args, "data", None))


def _eval_adapter_dir(recipe: Recipe) -> Path:
    """Which adapter ``peftlab eval RECIPE`` evaluates: the run's own (output.dir/adapter), else the recipe's
    adapter.init_from (e.g. a PEFT adapter to evaluate on the recipe's data)."""
    own = recipe.output_dir / "adapter"
    if (own / "adapter_config.json").is_file():
        return own
    if recipe.adapter.init_from:
        return recipe.resolve_path(recipe.adapter.init_from)
    raise PeftlabError(f"no adapter at {own}: train first (peftlab train RECIPE), set adapter.init_from to an "
                       "adapter directory, or pass the adapter directory itself (peftlab eval DIR)")


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate an adapter directory (peftlab or plain PEFT), or the adapter of a recipe."""
    from peftlab.data.collate import collate
    from peftlab.data.pipeline import build_data
    from peftlab.evaluation.evaluate import evaluate
    from peftlab.model.load import build_model
    from peftlab.objectives.causal_lm import LossSettings
    from peftlab.recipe.from_adapter import eval_data_config

    target = Path(args.target)
    if target.is_dir():
        adapter_dir = target
        recipe = _adapter_recipe(args, target)
    else:
        from peftlab.recipe.parse import load_recipe

        overrides = args.set + (["model.trust_remote_code=true"] if args.trust_remote_code else [])
        recipe = load_recipe(target, overrides=overrides)
        if args.model:
            recipe.model.name = args.model
        if args.data:
            recipe.data = eval_data_config(recipe.data, args.data)
        adapter_dir = None if args.base_only else _eval_adapter_dir(recipe)
    if not recipe.data.eval and not recipe.data.eval_split:
        raise PeftlabError("peftlab eval: nothing to evaluate on — the recipe has no eval data (data.eval or "
                           "data.eval_split); pass --data FILE (held-out rows in any supported format) or set "
                           "data.eval in the recipe")
    if recipe.task != "causal_lm" and not args.base_only:  # classification/regression: LoRA + head
        from peftlab.evaluation.predict import evaluate_adapter_dir

        print(json.dumps(evaluate_adapter_dir(adapter_dir, recipe), indent=2))
        return 0
    if adapter_dir is not None and not args.base_only:
        logger.info("evaluating adapter %s on %s", adapter_dir, recipe.model.name)
    loaded = build_model(recipe, adapter_dir=None if args.base_only else adapter_dir, trainable=False,
                         with_adapter=not args.base_only)
    data = build_data(recipe.data, loaded.tokenizer, seed=recipe.train.seed, base_dir=Path(recipe.base_dir))
    if not data.eval:
        raise PeftlabError("peftlab eval: the eval data came out empty after tokenisation (check data.eval / "
                           "data.eval_split and data.max_seq_len)")
    bs = recipe.train.micro_batch_size
    batches = []
    for i in range(0, len(data.eval), bs):
        b = collate(data.eval[i:i + bs], pad_token_id=data.pad_token_id,
                    attn_implementation=recipe.model.attn_implementation)
        b.pop("loss_weights", None)
        batches.append({k: v.to(loaded.device) if hasattr(v, "to") else v for k, v in b.items()})
    if recipe.preference is not None and not args.base_only:
        metrics = _preference_metrics(recipe, loaded, data, batches)
    else:
        metrics = evaluate(loaded.model, loaded.tokenizer, batches, data.eval_prompts, recipe=recipe,
                           settings=LossSettings.from_recipe(recipe, loaded.model))
    print(json.dumps(metrics, indent=2))
    return 0


def _preference_metrics(recipe: Recipe, loaded: Any, data: Any, batches: list[dict[str, Any]]) -> dict[str, Any]:
    """A preference adapter's eval figures (eval_loss, eval_rewards/*, eval_logps/*) as its run computed them.

    The reference of ``reference: precomputed`` is the model as training started: the bare base when the run had
    no ``adapter.init_from`` (then the adapters-off forward gives the same values, computed here), else base +
    that adapter, whose log-probs only the run's ``reference_logps.json`` holds (read back under its key)."""
    from peftlab.objectives.preference import REFERENCE_FILE, build_preference_objective, reference_key
    from peftlab.objectives.reference import ReferenceCache

    objective = build_preference_objective(recipe, loaded, data)
    pref = recipe.preference
    if pref.needs_reference and pref.reference == "precomputed":
        if not recipe.adapter.init_from:
            objective.config = pref.model_copy(update={"reference": "adapters_off"})
        else:
            path = recipe.output_dir / REFERENCE_FILE
            cache = ReferenceCache.read(path, reference_key(recipe, objective.data_fingerprint))
            if cache is None:
                raise PeftlabError(
                    f"peftlab eval: this preference run's reference is its base + adapter.init_from "
                    f"({recipe.adapter.init_from}), whose log-probs are stored only in {path}, which is missing or "
                    "was computed for other data; evaluate with the run's own recipe and eval data (peftlab eval "
                    "RECIPE), or read the run's eval figures in its metrics.jsonl")
            objective.cache = cache
    return objective.evaluate(loaded.model, batches)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from an adapter (or a base model) for each prompt: one line each (JSON when several)."""
    from peftlab.evaluation.generate import generate_text
    from peftlab.model.load import build_model
    from peftlab.recipe.from_adapter import base_model_recipe

    if args.adapter:
        recipe = _adapter_recipe(args, Path(args.adapter))
    elif args.model:
        recipe = base_model_recipe(args.model, args.set, trust_remote_code=args.trust_remote_code)
    else:
        raise PeftlabError("pass --adapter DIR (a trained adapter, peftlab or PEFT) or --model ID|DIR (a base "
                           "model alone)")
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise PeftlabError("no prompt: pass --prompt TEXT (repeatable) or prompts on stdin, one per line")
    empty = [i for i, p in enumerate(prompts, start=1) if not p.strip()]
    if empty:
        raise PeftlabError(f"prompt {empty[0]} of {len(prompts)} is empty; give every --prompt some text")
    loaded = build_model(recipe, adapter_dir=args.adapter, trainable=False, with_adapter=bool(args.adapter))
    outs = generate_text(loaded.model, loaded.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         seed=args.seed, system=recipe.data.system_prompt)
    for p, o in zip(prompts, outs):
        print(o if len(prompts) == 1 else json.dumps({"prompt": p, "generation": o}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify (or regress) every row of a JSONL file with a classification adapter."""
    from peftlab.evaluation.predict import predict_file

    n = predict_file(args.adapter, args.input, args.output, text_field=args.text_field,
                     batch_size=args.batch_size, device=args.device, trust_remote_code=args.trust_remote_code)
    print(f"peftlab: {n} predictions written to {args.output}")
    return 0
