"""The ``peftlab`` command line: train | eval | generate | data | quickstart.

User errors (:class:`~peftlab.errors.PeftlabError`) are printed as one clear message and exit with
status 2; no traceback. ``PEFTLAB_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from peftlab.errors import PeftlabError

QUICKSTART_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def _recipe(args) -> object:
    from peftlab.recipe import load_recipe

    return load_recipe(args.recipe, overrides=args.set)


def cmd_train(args) -> int:
    from peftlab.trainer import train

    result = train(_recipe(args), quiet=args.quiet)
    return 0 if result.state.step > 0 else 1


def _adapter_recipe(path: Path, overrides: list[str]):
    """The recipe stored next to an adapter by ``peftlab train`` (with overrides applied)."""
    from peftlab.recipe import load_recipe

    stored = path / "peftlab_recipe.yaml"
    if not stored.is_file():
        raise PeftlabError(f"{path} has no peftlab_recipe.yaml; pass the training recipe instead")
    return load_recipe(stored, overrides=overrides)


def cmd_eval(args) -> int:
    """Evaluate an adapter directory (or the final adapter of a recipe's output dir)."""
    from peftlab.data import build_data, collate
    from peftlab.evaluate import evaluate
    from peftlab.loss import LossSettings
    from peftlab.models import build_model

    target = Path(args.target)
    if target.is_dir():
        adapter_dir = target
        recipe = _adapter_recipe(target, args.set)
    else:
        recipe = _recipe(argparse.Namespace(recipe=target, set=args.set))
        adapter_dir = recipe.output_dir / "adapter"
    if args.base_only:
        loaded = build_model(recipe, trainable=False)
    else:
        if not (adapter_dir / "adapter_config.json").is_file():
            raise PeftlabError(f"no adapter at {adapter_dir}: train first (peftlab train RECIPE) or pass an adapter dir")
        loaded = build_model(recipe, adapter_dir=adapter_dir, trainable=False)
    data = build_data(recipe.data, loaded.tokenizer, seed=recipe.train.seed, base_dir=Path(recipe.base_dir))
    batches = None
    if data.eval:
        bs = recipe.train.micro_batch_size
        batches = []
        for i in range(0, len(data.eval), bs):
            b = collate(data.eval[i:i + bs], pad_token_id=data.pad_token_id,
                        attn_implementation=recipe.model.attn_implementation)
            b.pop("loss_weights", None)
            batches.append({k: v.to(loaded.device) if hasattr(v, "to") else v for k, v in b.items()})
    metrics = evaluate(loaded.model, loaded.tokenizer, batches, data.eval_prompts, recipe=recipe,
                       settings=LossSettings.from_recipe(recipe, loaded.model))
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(args) -> int:
    from peftlab.generate import generate_text
    from peftlab.models import build_model

    adapter = Path(args.adapter)
    recipe = _adapter_recipe(adapter, args.set)
    loaded = build_model(recipe, adapter_dir=adapter, trainable=False)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise PeftlabError("no prompt: pass --prompt TEXT (repeatable) or prompts on stdin, one per line")
    outs = generate_text(loaded.model, loaded.tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         seed=args.seed)
    for p, o in zip(prompts, outs):
        print(o if len(prompts) == 1 else json.dumps({"prompt": p, "generation": o}))
    return 0


def cmd_data(args) -> int:
    from peftlab.data import build_data, format_stats, preview
    from peftlab.models import load_tokenizer

    recipe = _recipe(args)
    tok = load_tokenizer(recipe.model.tokenizer or recipe.model.name, revision=recipe.model.revision,
                         trust_remote_code=recipe.model.trust_remote_code)
    bundle = build_data(recipe.data, tok, seed=recipe.train.seed, base_dir=Path(recipe.base_dir))
    print(preview(bundle, tok, n=args.n, color=sys.stdout.isatty()))
    print(format_stats(bundle.stats))
    return 0


def cmd_quickstart(args) -> int:
    """Generate the quickstart data (if missing) and train recipes/quickstart.yaml."""
    from peftlab.recipe import load_recipe
    from peftlab.trainer import train

    recipe_path = Path(args.recipe) if args.recipe else QUICKSTART_RECIPE
    data_dir = recipe_path.parent / "data" / "quickstart"
    if not (data_dir / "train.jsonl").is_file():
        sys.path.insert(0, str(recipe_path.parent))
        import make_quickstart_data  # recipes/make_quickstart_data.py

        make_quickstart_data.main(["--out", str(data_dir)])
    train(load_recipe(recipe_path, overrides=args.set), quiet=args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning of LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_set(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")
        return sp

    sp = with_set(sub.add_parser("train", help="fine-tune as a recipe says"))
    sp.add_argument("recipe")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_train)

    sp = with_set(sub.add_parser("eval", help="evaluate an adapter dir or a recipe's trained adapter"))
    sp.add_argument("target", help="RECIPE.yaml or ADAPTER_DIR")
    sp.add_argument("--base-only", action="store_true", help="evaluate the base model with a fresh (no-op) adapter")
    sp.set_defaults(fn=cmd_eval)

    sp = with_set(sub.add_parser("generate", help="generate text with a trained adapter"))
    sp.add_argument("--adapter", required=True)
    sp.add_argument("--prompt", action="append", default=[])
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sp.add_argument("--temperature", type=float, default=0.7)
    sp.add_argument("--top-p", type=float, default=0.9)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_generate)

    sp = with_set(sub.add_parser("data", help="preview tokenized samples and data statistics"))
    sp.add_argument("recipe")
    sp.add_argument("-n", type=int, default=3)
    sp.set_defaults(fn=cmd_data)

    sp = with_set(sub.add_parser("quickstart", help="train the built-in tiny model on the shipped task"))
    sp.add_argument("--recipe", default=None)
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PeftlabError as err:
        if os.environ.get("PEFTLAB_DEBUG"):
            raise
        print(f"peftlab: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
