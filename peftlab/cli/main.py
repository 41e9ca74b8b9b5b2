"""The ``peftlab`` command line: train | eval | generate | data | quickstart | predict | sweep |
distill-cache | estimate | merge | export | launch.

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

QUICKSTART_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def _recipe(args) -> object:
    from peftlab.recipe.parse import load_recipe

    return load_recipe(args.recipe, overrides=args.set)


def cmd_train(args) -> int:
    from peftlab.engine.process_group import shutdown_distributed
    from peftlab.trainer.loop import train

    try:
        result = train(_recipe(args), quiet=args.quiet)
    except BaseException:
        shutdown_distributed(synchronize=False)
        raise
    shutdown_distributed()
    return 0 if result.state.step > 0 else 1


def _adapter_recipe(args, path: Path):
    """The recipe that rebuilds an adapter directory's model (its stored recipe read as untrusted input, or
    one made from a plain PEFT adapter's config), with the CLI's --set / --model / --data applied."""
    from peftlab.recipe.from_adapter import recipe_for_adapter

    return recipe_for_adapter(path, args.set, model=getattr(args, "model", None),
                              trust_remote_code=args.trust_remote_code, data=getattr(args, "data", None))


def cmd_predict(args) -> int:
    from peftlab.objectives.classification import predict_file

    n = predict_file(args.adapter, args.input, args.output, text_field=args.text_field,
                     batch_size=args.batch_size, device=args.device, trust_remote_code=args.trust_remote_code)
    print(f"peftlab: {n} predictions written to {args.output}")
    return 0


def cmd_sweep(args) -> int:
    from peftlab.trainer.sweep import format_table, load_sweep, run_sweep

    spec, base, base_dir = load_sweep(args.sweep, overrides=args.set)
    result = run_sweep(spec, base, base_dir, say=(lambda s: None) if args.quiet else print)
    print(format_table(result), end="")
    print(f"peftlab: best {result.best.name} ({spec.metric}={result.best.last.score:.4f}); results: "
          f"{result.output_dir / 'results.csv'}; best recipe: {result.output_dir / 'best_recipe.yaml'}")
    return 0


def _eval_adapter_dir(args, recipe) -> Path:
    """Which adapter ``peftlab eval RECIPE`` evaluates: the run's own (output.dir/adapter), else the recipe's
    adapter.init_from (e.g. a PEFT adapter to evaluate on the recipe's data)."""
    own = recipe.output_dir / "adapter"
    if (own / "adapter_config.json").is_file():
        return own
    if recipe.adapter.init_from:
        return recipe.resolve_path(recipe.adapter.init_from)
    raise PeftlabError(f"no adapter at {own}: train first (peftlab train RECIPE), set adapter.init_from to an "
                       "adapter directory, or pass the adapter directory itself (peftlab eval DIR)")


def cmd_eval(args) -> int:
    """Evaluate an adapter directory (peftlab or plain PEFT), or the adapter of a recipe."""
    from peftlab.data import build_data, collate
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
        adapter_dir = None if args.base_only else _eval_adapter_dir(args, recipe)
    if not recipe.data.eval and not recipe.data.eval_split:
        raise PeftlabError("peftlab eval: nothing to evaluate on — the recipe has no eval data (data.eval or "
                           "data.eval_split); pass --data FILE (held-out rows in any supported format) or set "
                           "data.eval in the recipe")
    if recipe.task != "causal_lm" and not args.base_only:  # classification/regression: LoRA + head
        from peftlab.objectives.classification import evaluate_adapter_dir

        print(json.dumps(evaluate_adapter_dir(adapter_dir, recipe), indent=2))
        return 0
    if adapter_dir is not None and not args.base_only:
        print(f"peftlab: evaluating adapter {adapter_dir} on {recipe.model.name}", file=sys.stderr)
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
    metrics = evaluate(loaded.model, loaded.tokenizer, batches, data.eval_prompts, recipe=recipe,
                       settings=LossSettings.from_recipe(recipe, loaded.model))
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_generate(args) -> int:
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


def cmd_data(args) -> int:
    from peftlab.data import build_data, format_stats, preview
    from peftlab.model.load import load_tokenizer

    recipe = _recipe(args)
    tok = load_tokenizer(recipe.model.tokenizer or recipe.model.name, revision=recipe.model.revision,
                         trust_remote_code=recipe.model.trust_remote_code)
    bundle = build_data(recipe.data, tok, seed=recipe.train.seed, base_dir=Path(recipe.base_dir))
    print(preview(bundle, tok, n=args.n, color=sys.stdout.isatty()))
    print(format_stats(bundle.stats))
    return 0


def cmd_quickstart(args) -> int:
    """Generate the quickstart data (if missing) and train recipes/quickstart.yaml."""
    from peftlab.recipe.parse import load_recipe
    from peftlab.trainer.loop import train

    recipe_path = Path(args.recipe) if args.recipe else QUICKSTART_RECIPE
    data_dir = recipe_path.parent / "data" / "quickstart"
    if not (data_dir / "train.jsonl").is_file():
        sys.path.insert(0, str(recipe_path.parent))
        import make_quickstart_data  # recipes/make_quickstart_data.py

        make_quickstart_data.main(["--out", str(data_dir)])
    train(load_recipe(recipe_path, overrides=args.set), quiet=args.quiet)
    return 0


def cmd_distill_cache(args) -> int:
    """Run the recipe's distillation teacher once over the training data and store its top-k log-probs."""
    from peftlab.objectives.teacher_cache import build_teacher_cache

    cache = build_teacher_cache(_recipe(args), force=args.force, shard_mb=args.shard_mb,
                                batch_size=args.batch_size, quiet=args.quiet)
    print(f"teacher cache: {cache}")
    return 0


def _float_list(values: list[str] | None, flag: str) -> list[float] | None:
    if values is None:
        return None
    try:
        return [float(v) for v in values]
    except ValueError:
        raise PeftlabError(f"{flag} {' '.join(values)}: expected numbers, e.g. {flag} 1.0 0.5") from None


def cmd_merge(args) -> int:
    """Merge one adapter into its base (--adapter) or combine several adapters into one (--adapters/--config)."""
    if args.config or args.adapters:
        from peftlab.export.combine import combine_adapters, load_combine_config

        if args.adapter:
            raise PeftlabError("--adapter merges one adapter into its base; --adapters/--config combine adapters. "
                               "Use one of them")
        kwargs = load_combine_config(args.config) if args.config else {"adapters": args.adapters}
        for key, value in (("method", args.method), ("density", args.density), ("seed", args.seed),
                           ("majority_sign_method", args.majority_sign_method), ("svd_rank", args.svd_rank),
                           ("base", args.base), ("out_dir", args.out)):
            if value is not None:
                kwargs[key] = value
        if args.weights is not None or "weights" not in kwargs:
            kwargs["weights"] = _float_list(args.weights, "--weights") or [1.0] * len(kwargs["adapters"])
        if not kwargs.get("out_dir"):
            raise PeftlabError("--out DIR is required (or `out:` in the --config file)")
        result = combine_adapters(**kwargs, overwrite=args.overwrite)
        print(f"combined {len(kwargs['adapters'])} adapters ({result.method}, r={result.rank}, "
              f"{result.modules} modules) -> {result.out_dir}")
        if args.push_to_hub:
            from peftlab.export.gguf import model_card, push_to_hub

            print(push_to_hub(result.out_dir, args.push_to_hub, model_card(
                title=args.push_to_hub, base=kwargs.get("base"), kind="adapter",
                extra={"Combination": f"{result.method} of {kwargs['adapters']} with weights {kwargs['weights']}"})))
        return 0
    if not args.adapter:
        raise PeftlabError("pass --adapter DIR (merge into the base) or --adapters A B ... / --config FILE (combine)")
    if not args.out:
        raise PeftlabError("--out DIR is required: where the merged model is written")
    from peftlab.export.merge import merge_adapter

    result = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype,
                           base_precision=args.base_precision, max_shard_size=args.max_shard_size,
                           report_samples=args.report_samples, overwrite=args.overwrite, overrides=args.set,
                           trust_remote_code=args.trust_remote_code)
    if args.push_to_hub:
        from peftlab.export.gguf import model_card, push_to_hub

        card = model_card(title=args.push_to_hub, base=args.base, kind="merged model",
                          adapter_dir=Path(args.adapter), report=result.report)
        print(push_to_hub(result.out_dir, args.push_to_hub, card))
    return 0


def cmd_export(args) -> int:
    """Export for serving: GGUF (llama.cpp), a validated PEFT adapter, or merged safetensors."""
    from peftlab.export import gguf as export

    if bool(args.model) == bool(args.adapter):
        raise PeftlabError("pass exactly one of --model DIR (a merged model) and --adapter DIR (merged on the way)")
    out = Path(args.out)
    report = None
    if args.format == "peft":
        if not args.adapter:
            raise PeftlabError("--format peft exports an adapter: pass --adapter DIR")
        res = export.export_peft(args.adapter, out, base=args.base, overwrite=args.overwrite)
        print(f"adapter ({res.modules} modules) -> {res.path}")
        for note in res.notes:
            print(note)
        kind = "adapter"
    elif args.format == "safetensors":
        if not args.adapter:
            raise PeftlabError("--format safetensors writes a merged model: pass --adapter DIR "
                               "(a --model directory already is one)")
        from peftlab.export.merge import merge_adapter

        report = merge_adapter(args.adapter, out, base=args.base, dtype=args.dtype,
                               base_precision=args.base_precision, overwrite=args.overwrite,
                               overrides=args.set).report
        kind = "merged model"
    else:
        import shutil
        import tempfile

        from peftlab.export.merge import merge_adapter, resolve_source

        # Everything the export would refuse (architecture, RoPE, --type, an existing or unwritable --out)
        # is refused now, before a merge that can take long; for an adapter the base's config decides.
        source = Path(args.model) if args.model else resolve_source(args.adapter, args.base, args.set).base_dir
        merge_flags = ((["--base", args.base] if args.base else []) + [f"--set={kv}" for kv in args.set]
                       + (["--base-precision", args.base_precision] if args.base_precision != "trained" else []))
        export.check_gguf_export(source, out, type=args.type, overwrite=args.overwrite, model=args.model,
                                 adapter=args.adapter, merge_flags=merge_flags)
        if args.model:
            res = export.export_gguf(args.model, out, type=args.type, overwrite=args.overwrite)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=".peftlab-merge-", dir=out.parent))
            try:
                merged = tmp / "merged"
                report = merge_adapter(args.adapter, merged, base=args.base, dtype="fp32",
                                       base_precision=args.base_precision, overrides=args.set).report
                try:
                    res = export.export_gguf(merged, out, type=args.type, overwrite=args.overwrite)
                except PeftlabError as exc:  # keep the merge: the export can be rerun from it
                    keep = export.keep_merged(merged, out)
                    raise PeftlabError(f"{exc} The merged model is kept in {keep}: export it with "
                                       f"--model {keep} (no second merge).") from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"GGUF ({res.type}, {res.tensors} tensors, {res.bytes / 1e6:.1f} MB) -> {res.path}")
        for note in res.notes:
            print(f"note: {note}")
        kind = f"GGUF ({args.type})"
    if args.push_to_hub:
        card = export.model_card(title=args.push_to_hub, base=args.base, kind=kind,
                                 adapter_dir=Path(args.adapter) if args.adapter else None, report=report)
        print(export.push_to_hub(out, args.push_to_hub, card))
    return 0


def cmd_launch(args) -> int:
    """Train a recipe across nodes/processes through the deepspeed launcher (see docs/distributed.md)."""
    from peftlab.engine.launch import launch

    return launch(args.recipe, hostfile=args.hostfile, no_ssh=args.no_ssh, node_rank=args.node_rank,
                  nproc_per_node=args.nproc_per_node, master_addr=args.master_addr, master_port=args.master_port,
                  launcher=args.launcher, preflight_timeout=args.preflight_timeout, overrides=args.set)


def cmd_estimate(args) -> int:
    """Predicted peak memory of a recipe's run, by component; exit 1 when it does not fit the budget."""
    from peftlab.engine.planner import estimate, format_estimate, parse_size

    budget = parse_size(args.device_memory) if args.device_memory else None
    est = estimate(_recipe(args), device_memory=budget, gpus=args.gpus, device=args.device)
    print(json.dumps(est.to_dict(), indent=2) if args.json else format_estimate(est, gpus=args.gpus))
    return 0 if est.fits else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning of LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_trust(sp):
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="allow the base model's own Python code to run (never turned on by an adapter dir)")
        return sp

    def with_set(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")
        return sp

    sp = with_set(sub.add_parser("train", help="fine-tune as a recipe says"))
    sp.add_argument("recipe")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_train)

    sp = with_set(sub.add_parser("eval", help="evaluate an adapter dir (peftlab or PEFT) or a recipe's adapter"))
    sp.add_argument("target", help="RECIPE.yaml or ADAPTER_DIR")
    sp.add_argument("--base-only", action="store_true", help="evaluate the base model alone (no adapter)")
    sp.add_argument("--model", default=None, help="base model id/dir (default: the adapter's)")
    sp.add_argument("--data", nargs="+", default=None, metavar="FILE",
                    help="evaluate on these files instead of the recipe's eval data")
    with_trust(sp)
    sp.set_defaults(fn=cmd_eval)

    sp = with_set(sub.add_parser("sweep", help="grid/random search over recipe keys; ranked results + best recipe"))
    sp.add_argument("sweep", help="SWEEP.yaml (base recipe, parameters, metric; see docs/workflows.md)")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_sweep)

    sp = sub.add_parser("predict", help="batch inference of a classification/regression adapter to JSONL")
    sp.add_argument("adapter", help="ADAPTER_DIR of a task: classification|regression run (adapter/ or best/)")
    sp.add_argument("--input", required=True, help="JSONL file with a text field per row")
    sp.add_argument("--output", required=True, help="JSONL file to write (input row + label/probs or prediction)")
    sp.add_argument("--text-field", default="text")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    with_trust(sp)
    sp.set_defaults(fn=cmd_predict)

    sp = with_set(sub.add_parser("generate", help="generate text with a trained adapter, or a base model"))
    sp.add_argument("--adapter", default=None, help="adapter dir (peftlab or PEFT format)")
    sp.add_argument("--model", default=None, help="base model id/dir: alone, or instead of the adapter's base")
    with_trust(sp)
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

    sp = with_set(sub.add_parser("distill-cache", help="store a distillation teacher's top-k log-probs "
                                 "for offline distillation (recipe distill.mode: offline)"))
    sp.add_argument("recipe")
    sp.add_argument("--force", action="store_true", help="rebuild the cache even if a matching one exists")
    sp.add_argument("--shard-mb", type=int, default=256, help="size of one cache shard in MB")
    sp.add_argument("--batch-size", type=int, default=None, help="teacher batch size (default: train.micro_batch_size)")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_distill_cache)

    sp = with_set(sub.add_parser("estimate", help="predict peak memory of a recipe's run (from the config alone)"))
    sp.add_argument("recipe")
    sp.add_argument("--device-memory", default=None, metavar="SIZE", help="budget per rank, e.g. 24GiB")
    sp.add_argument("--gpus", type=int, default=1, help="data-parallel ranks for the ZeRO columns")
    sp.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the recipe's train.device")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_estimate)

    sp = with_set(sub.add_parser("quickstart", help="train the built-in tiny model on the shipped task"))
    sp.add_argument("--recipe", default=None)
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_quickstart)

    sp = with_set(sub.add_parser("merge", help="merge an adapter into its base, or combine adapters into one"))
    sp.add_argument("--adapter", help="adapter dir to merge into its base model")
    sp.add_argument("--adapters", nargs="+", metavar="DIR", help="adapter dirs to combine into one adapter")
    sp.add_argument("--config", help="YAML file describing a combination (method, adapters, weights, ...)")
    sp.add_argument("--base", help="base model id/dir (default: from the adapter's recipe or adapter_config.json)")
    sp.add_argument("--out", help="output directory")
    sp.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="merged weights' dtype (default auto: the base checkpoint's)")
    sp.add_argument("--base-precision", default="trained", choices=["trained", "original"],
                    help="trained: the base weights training saw (NF4-dequantised for QLoRA); original: the checkpoint's")
    sp.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")
    sp.add_argument("--report-samples", type=int, default=8, help="held-out samples in the fidelity report (0: skip)")
    sp.add_argument("--method", default=None, help="combination: linear | ties | dare_linear | dare_ties | svd | "
                    "magnitude_prune | cat | ties_svd | dare_linear_svd | dare_ties_svd (default linear)")
    sp.add_argument("--weights", nargs="+", default=None, help="one weight per adapter (default 1.0 each)")
    sp.add_argument("--density", type=float, default=None, help="fraction of values kept by ties/dare/magnitude_prune")
    sp.add_argument("--majority-sign-method", default=None, choices=["total", "frequency"])
    sp.add_argument("--svd-rank", type=int, default=None, help="rank of an svd combination (default: largest input rank)")
    sp.add_argument("--seed", type=int, default=None, help="seed of DARE's random drops (default 0)")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    sp.add_argument("--push-to-hub", metavar="REPO", help="upload the result with a generated model card")
    with_trust(sp)
    sp.set_defaults(fn=cmd_merge)

    sp = with_set(sub.add_parser("export", help="export for serving: gguf | peft | safetensors"))
    sp.add_argument("--format", required=True, choices=["gguf", "peft", "safetensors"])
    sp.add_argument("--out", required=True, help="output file (gguf) or directory (peft, safetensors)")
    sp.add_argument("--model", help="a merged HF model dir (gguf)")
    sp.add_argument("--adapter", help="an adapter dir (merged into its base on the way for gguf/safetensors)")
    sp.add_argument("--base", help="base model id/dir (default: from the adapter)")
    sp.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                    help="GGUF tensor type (default f16)")
    sp.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="safetensors: merged weights' dtype (default auto)")
    sp.add_argument("--base-precision", default="trained", choices=["trained", "original"])
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--push-to-hub", metavar="REPO", help="upload the export with a generated model card")
    sp.set_defaults(fn=cmd_export)

    sp = with_set(sub.add_parser("launch", help="train across processes and nodes (DeepSpeed launcher + preflight)"))
    sp.add_argument("recipe", help="a recipe with a 'deepspeed:' config")
    sp.add_argument("--hostfile", required=True, help="DeepSpeed hostfile: 'HOST slots=N' per node")
    sp.add_argument("--no-ssh", action="store_true", help="run this command on every node, each with --node-rank")
    sp.add_argument("--node-rank", type=int, default=None, help="this node's line in the hostfile (from 0)")
    sp.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: slots)")
    sp.add_argument("--master-addr", default=None, help="address of node rank 0 (default: first host)")
    sp.add_argument("--master-port", type=int, default=29500, help="rendezvous port (preflight uses port+1)")
    sp.add_argument("--launcher", default="pdsh", help="ssh launch backend: pdsh|openmpi|mpich|mvapich|impi|slurm")
    sp.add_argument("--preflight-timeout", type=float, default=120.0,
                    help="seconds to wait for every node (and then every rank) to join")
    sp.set_defaults(fn=cmd_launch)
    return p


def main(argv: list[str] | None = None) -> int:
    from peftlab.engine.hostmem import configure_openmp_wait_policy

    configure_openmp_wait_policy()  # libgomp reads OMP_WAIT_POLICY once, when torch loads it: before that
    args = build_parser().parse_args(argv)
    from peftlab.metrics.console import setup_logging

    setup_logging("warning" if getattr(args, "quiet", False) else None)  # PEFTLAB_LOG_LEVEL wins
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
