#!/usr/bin/env python3
"""Teacher vs distilled student vs the same student trained on hard labels only.

Trains the student of a distillation recipe twice — with its ``distill:`` section and without it
(plain fine-tuning, same steps, data and seed) — evaluates the teacher on the same held-out data,
and prints the three eval metrics plus each student's KL(teacher || student) on held-out targets.
The teacher adapter is trained first (``peftlab quickstart``) when it does not exist yet.

    .venv/bin/python -P recipes/distill_compare.py [--recipe recipes/distill-quickstart.yaml]
        [--set train.max_steps=100 ...] [--train-teacher]

Writes ``compare.json`` into the distilled run's output directory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    from peftlab.evaluation.evaluate import evaluate
    from peftlab.objectives.distillation import teacher_kl
    from peftlab.objectives.teacher import load_teacher
    from peftlab.recipe.parse import load_recipe, recipe_from_dict
    from peftlab.trainer.loop import Trainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(HERE / "distill-quickstart.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--train-teacher", action="store_true", help="(re)train the quickstart teacher first")
    args = ap.parse_args(argv)

    recipe = load_recipe(args.recipe, overrides=args.set)
    if recipe.distill is None:
        raise SystemExit(f"{args.recipe} has no distill: section")
    adapter = recipe.distill.teacher.adapter
    if adapter and (args.train_teacher or not (recipe.resolve_path(adapter) / "adapter_config.json").is_file()):
        from peftlab.cli.main import main as peftlab_main

        print(f"training the teacher: peftlab quickstart (-> {recipe.resolve_path(adapter)})", flush=True)
        if peftlab_main(["quickstart", "--quiet"]) != 0:
            return 1

    times = {}
    t0 = time.perf_counter()
    distilled = Trainer(recipe, quiet=True)
    d_result = distilled.train()
    times["distilled"] = time.perf_counter() - t0

    raw = recipe.to_dict()
    raw["distill"] = None
    raw["output"]["dir"] = str(recipe.output_dir) + "-hard-labels"
    t0 = time.perf_counter()
    hard = Trainer(recipe_from_dict(raw, base_dir=recipe.base_dir), quiet=True)
    h_result = hard.train()
    times["hard_labels"] = time.perf_counter() - t0

    teacher = getattr(distilled.objective, "teacher", None) or load_teacher(recipe, distilled.device)
    batches = distilled.eval_batches()
    t_metrics = evaluate(teacher.model, teacher.tokenizer, batches, distilled.data.eval_prompts, recipe=recipe,
                         settings=distilled.objective.settings)
    temperature = 1.0
    rows = {
        f"teacher ({teacher.label})": t_metrics,
        f"student distilled ({recipe.model.name})": dict(d_result.eval_after, kl_to_teacher=teacher_kl(
            distilled.model, teacher.model, batches, temperature=temperature)),
        f"student hard labels ({recipe.model.name})": dict(h_result.eval_after, kl_to_teacher=teacher_kl(
            hard.model, teacher.model, batches, temperature=temperature)),
    }
    keys = ("exact_match", "eval_loss", "kl_to_teacher")
    print(f"\n{'model':<62}" + "".join(f"{k:>15}" for k in keys))
    for name, m in rows.items():
        print(f"{name:<62}" + "".join(f"{m[k]:>15.4f}" if k in m else f"{'-':>15}" for k in keys))
    steps = recipe.train.max_steps
    print(f"\n{steps} steps each; train time: distilled {times['distilled']:.0f}s, hard labels "
          f"{times['hard_labels']:.0f}s; eval on {len(distilled.data.eval or [])} held-out rows, exact match on "
          f"{min(recipe.eval.max_prompts, len(distilled.data.eval_prompts))} prompts")
    out = {name: {k: v for k, v in m.items() if k != "samples"} for name, m in rows.items()}
    out["_run"] = {"recipe": str(args.recipe), "overrides": args.set, "train_time_s": times}
    (recipe.output_dir / "compare.json").write_text(json.dumps(out, indent=2))
    print(f"written: {recipe.output_dir / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
