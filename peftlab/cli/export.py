"""``peftlab merge | export``: an adapter merged into its base, adapters combined into one, and exports for
serving (GGUF, a validated PEFT adapter, merged safetensors), optionally pushed to the Hub. Each prints the
result and where it was written; notes go through logging.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from peftlab.errors import PeftlabError

logger = logging.getLogger(__name__)


def _float_list(values: list[str] | None, flag: str) -> list[float] | None:
    if values is None:
        return None
    try:
        return [float(v) for v in values]
    except ValueError:
        raise PeftlabError(f"{flag} {' '.join(values)}: expected numbers, e.g. {flag} 1.0 0.5") from None


def cmd_merge(args: argparse.Namespace) -> int:
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
            from peftlab.export.hub import model_card, push_to_hub

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
        from peftlab.export.hub import model_card, push_to_hub

        card = model_card(title=args.push_to_hub, base=args.base, kind="merged model",
                          adapter_dir=Path(args.adapter), report=result.report)
        print(push_to_hub(result.out_dir, args.push_to_hub, card))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export for serving: GGUF (llama.cpp), a validated PEFT adapter, or merged safetensors."""
    from peftlab.export import gguf as export
    from peftlab.export.hub import model_card, push_to_hub
    from peftlab.export.peft import export_peft

    if bool(args.model) == bool(args.adapter):
        raise PeftlabError("pass exactly one of --model DIR (a merged model) and --adapter DIR (merged on the way)")
    out = Path(args.out)
    report = None
    if args.format == "peft":
        if not args.adapter:
            raise PeftlabError("--format peft exports an adapter: pass --adapter DIR")
        res = export_peft(args.adapter, out, base=args.base, overwrite=args.overwrite)
        print(f"adapter ({res.modules} modules) -> {res.path}")
        for note in res.notes:
            logger.info("%s", note)
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

        from peftlab.export.merge import merge_adapter
        from peftlab.export.source import resolve_source

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
            logger.info("note: %s", note)
        kind = f"GGUF ({args.type})"
    if args.push_to_hub:
        card = model_card(title=args.push_to_hub, base=args.base, kind=kind,
                          adapter_dir=Path(args.adapter) if args.adapter else None, report=report)
        print(push_to_hub(out, args.push_to_hub, card))
    return 0
