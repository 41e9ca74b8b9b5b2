"""``peftlab train | quickstart | sweep | distill-cache | launch | estimate | data``: the commands that take a
training recipe. Each prints what the command produces (a table, a path, the preview); its progress and notes
go through logging (:mod:`peftlab.metrics.console`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the recipe imports pydantic and the data package (torch): commands import what they run
    from peftlab.recipe.schema import Recipe


def _recipe(args: argparse.Namespace) -> Recipe:
    from peftlab.recipe.parse import load_recipe

    return load_recipe(args.recipe, overrides=args.set)


def cmd_train(args: argparse.Namespace) -> int:
    """Train as the recipe says; exit 1 when not one optimizer step was taken."""
    from peftlab.engine.process_group import shutdown_distributed
    from peftlab.trainer.loop import train

    try:
        result = train(_recipe(args))  # --quiet is the console's level (main)
    except BaseException:
        shutdown_distributed(synchronize=False)
        raise
    shutdown_distributed()
    return 0 if result.state.step > 0 else 1


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Generate the quickstart data (if missing) and train the quickstart recipe: the shipped one, in place in a
    source checkout, else a copy in ``--dir`` (default: here) (:func:`peftlab.recipe.shipped.quickstart_recipe`)."""
    from peftlab.recipe.parse import load_recipe
    from peftlab.recipe.shipped import quickstart_recipe
    from peftlab.recipes import make_quickstart_data
    from peftlab.trainer.loop import train

    recipe_path = Path(args.recipe) if args.recipe else quickstart_recipe(args.dir)
    data_dir = recipe_path.parent / "data" / "quickstart"
    if not (data_dir / "train.jsonl").is_file():
        make_quickstart_data.main(["--out", str(data_dir)])
    train(load_recipe(recipe_path, overrides=args.set))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the shipped recipes, or copy the named ones (and their data scripts) into ``--dir``/recipes/."""
    from peftlab.recipe.shipped import copy_recipes, shipped_recipes

    if not args.names:
        recipes = shipped_recipes()
        width = max(map(len, recipes))
        for name, what in recipes.items():
            print(f"{name:<{width}}  {what}")
        print("copy one to edit and train it: peftlab recipes NAME [--dir DIR]")
        return 0
    for path in copy_recipes(args.names, args.dir):
        print(path)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train every trial of a sweep; print the ranked table and where the best recipe is."""
    from peftlab.trainer.sweep import format_table, load_sweep, run_sweep

    spec, base, base_dir = load_sweep(args.sweep, overrides=args.set)
    result = run_sweep(spec, base, base_dir)
    print(format_table(result), end="")
    print(f"peftlab: best {result.best.name} ({spec.metric}={result.best.last.score:.4f}); results: "
          f"{result.output_dir / 'results.csv'}; best recipe: {result.output_dir / 'best_recipe.yaml'}")
    return 0


def cmd_distill_cache(args: argparse.Namespace) -> int:
    """Run the recipe's distillation teacher once over the training data and store its top-k log-probs."""
    from peftlab.objectives.teacher_cache import build_teacher_cache

    cache = build_teacher_cache(_recipe(args), force=args.force, shard_mb=args.shard_mb,
                                batch_size=args.batch_size)
    print(f"teacher cache: {cache}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    """Train a recipe across nodes/processes through the deepspeed launcher (README, "Distributed training")."""
    from peftlab.engine.launch import launch
    from peftlab.trainer.setup import check_streaming

    check_streaming(_recipe(args))  # what every process's `peftlab train` would refuse: before any starts
    return launch(args.recipe, hostfile=args.hostfile, no_ssh=args.no_ssh, node_rank=args.node_rank,
                  nproc_per_node=args.nproc_per_node, master_addr=args.master_addr, master_port=args.master_port,
                  launcher=args.launcher, preflight_timeout=args.preflight_timeout, overrides=args.set)


def _estimated_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe ``peftlab estimate`` sizes as written, with one line (stderr: its stdout is the estimate) when
    ``peftlab train`` would refuse it as it is (e.g. streaming without train.max_steps)."""
    from peftlab.trainer.setup import streaming_problem

    recipe = _recipe(args)
    problem = streaming_problem(recipe)
    if problem is not None:
        logging.getLogger(__name__).warning(f"peftlab train will refuse this recipe as it is: {problem}")
    return recipe


def cmd_estimate(args: argparse.Namespace) -> int:
    """Predicted peak memory of a recipe's run, by component; exit 1 when it does not fit the budget."""
    from peftlab.engine.estimate_report import fmt, format_estimate, parse_size
    from peftlab.engine.model_shape import model_shape
    from peftlab.engine.planner import compute_dtype, estimate, max_context, run_device
    from peftlab.errors import PeftlabError

    if args.gpu_memory:
        args.device_memory, args.device = args.gpu_memory, "cuda"
    budget = parse_size(args.device_memory) if args.device_memory else None
    if args.max_context:
        if budget is None:
            raise PeftlabError("--max-context needs a budget: --gpu-memory 24GB (or --device-memory SIZE)")
        recipe = _estimated_recipe(args)
        device = args.device or run_device(recipe)
        shape = model_shape(recipe, compute_dtype(recipe, device), device=device)
        longest = max_context(recipe, budget, device=device, shape=shape)
        positions = shape.max_positions
        if args.json:
            print(json.dumps({"max_context": longest, "budget": budget, "micro_batch_size": 1,
                              "model_max_positions": positions}))
        else:
            beyond = bool(longest and positions and longest > positions)
            print(f"longest context that fits {fmt(budget)} (predicted, micro_batch_size=1): "
                  + (f"{longest} tokens" if longest else "none")
                  + (f" — more than the model's {positions} positions (max_position_embeddings): its whole context "
                     "fits" if beyond else ""))
        return 0 if longest else 1
    est = estimate(_estimated_recipe(args), device_memory=budget, gpus=args.gpus, device=args.device)
    print(json.dumps(est.to_dict(), indent=2) if args.json else format_estimate(est, gpus=args.gpus))
    return 0 if est.fits else 1


def cmd_data(args: argparse.Namespace) -> int:
    """Print the first tokenized samples (trained tokens marked), augmented as the first epochs see them when the
    recipe has ``augment:``, and the data statistics."""
    from peftlab.data.augment import build_augmenter, render_augmented
    from peftlab.data.pipeline import build_data
    from peftlab.data.preview import render_preview
    from peftlab.data.stats import format_stats
    from peftlab.model.load import load_tokenizer

    recipe = _recipe(args)
    tok = load_tokenizer(recipe.model.tokenizer or recipe.model.name, revision=recipe.model.revision,
                         trust_remote_code=recipe.model.trust_remote_code)
    bundle = build_data(recipe.data, tok, seed=recipe.train.seed, base_dir=Path(recipe.base_dir))
    print(render_preview(bundle, tok, n=args.n, color=sys.stdout.isatty()))
    augmenter = build_augmenter(recipe.augment, recipe.data, tok, seed=recipe.train.seed, base_dir=Path(recipe.base_dir))
    if augmenter is not None:
        print(render_augmented(bundle, augmenter, tok, n=args.n, color=sys.stdout.isatty()))
    print(format_stats(bundle.stats))
    return 0
