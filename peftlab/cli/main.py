"""The ``peftlab`` command line: train | eval | generate | data | quickstart | recipes | predict | sweep |
distill-cache | estimate | merge | export | launch.

This module is the parser and ``main``; the commands are in ``training`` (a training recipe: train,
quickstart, recipes, sweep, distill-cache, launch, estimate, data), ``inference`` (an adapter put to use: eval, generate,
predict) and ``export`` (merge, export). A command prints what it produces; messages go through logging
(``--quiet`` and ``PEFTLAB_LOG_LEVEL`` set how much is said). User errors
(:class:`~peftlab.errors.PeftlabError`) are printed as one clear message and exit with status 2; no
traceback. ``PEFTLAB_DEBUG=1`` shows tracebacks. Nothing here imports torch at import time: OpenMP's wait
policy must be chosen before torch loads it (:func:`main`).
"""
from __future__ import annotations

import argparse
import os
import sys

from peftlab.cli.export import cmd_export, cmd_merge
from peftlab.cli.inference import cmd_eval, cmd_generate, cmd_predict
from peftlab.cli.training import (
    cmd_data,
    cmd_distill_cache,
    cmd_estimate,
    cmd_launch,
    cmd_quickstart,
    cmd_recipes,
    cmd_sweep,
    cmd_train,
)
from peftlab.engine.hostmem import configure_openmp_wait_policy
from peftlab.errors import PeftlabError
from peftlab.metrics.console import setup_logging


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, its arguments and the function that runs it (``fn``); ``messages_to_stderr`` marks
    the commands whose stdout is their product (eval's JSON, generations, the estimate, the data preview)."""
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
    sp.set_defaults(fn=cmd_eval, messages_to_stderr=True)

    sp = with_set(sub.add_parser("sweep", help="grid/random search over recipe keys; ranked results + best recipe"))
    sp.add_argument("sweep", help="SWEEP.yaml: the base recipe, the keys to vary, and the eval metric that ranks the "
                                  "trials (default eval_loss; eval_rewards/accuracies for a preference recipe); see "
                                  "README.md, 'Sweeps'")
    sp.add_argument("--quiet", action="store_true", help="warnings only (the trials are always quiet)")
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
    sp.set_defaults(fn=cmd_generate, messages_to_stderr=True)

    sp = with_set(sub.add_parser("data", help="preview tokenized samples and data statistics"))
    sp.add_argument("recipe")
    sp.add_argument("-n", type=int, default=3)
    sp.set_defaults(fn=cmd_data, messages_to_stderr=True)

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
    sp.add_argument("--max-context", action="store_true",
                    help="print the longest context (tokens, micro_batch_size 1) whose predicted peak fits the budget")
    sp.add_argument("--gpu-memory", default=None, metavar="SIZE",
                    help="a GPU of this size, e.g. 24GB: --device-memory SIZE --device cuda")
    sp.set_defaults(fn=cmd_estimate, messages_to_stderr=True)

    sp = with_set(sub.add_parser("quickstart", help="train the built-in tiny model on the shipped task"))
    sp.add_argument("--recipe", default=None, help="train this recipe instead (its data in <its folder>/data/quickstart)")
    sp.add_argument("--dir", default=None, help="work here: DIR/recipes/quickstart.yaml (copied from the shipped one), "
                    "its data in DIR/recipes/data/quickstart, the run in DIR/runs/quickstart (default: the repository "
                    "in a source checkout, else the current directory)")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(fn=cmd_quickstart)

    sp = sub.add_parser("recipes", help="list the shipped recipes, or copy some to edit and train")
    sp.add_argument("names", nargs="*", metavar="NAME", help="copy these into DIR/recipes/ with their data scripts")
    sp.add_argument("--dir", default=None, help="where to copy them (default: the current directory)")
    sp.set_defaults(fn=cmd_recipes, messages_to_stderr=True)

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
    """Run one command; returns its exit status (2 for a user error, 130 when interrupted)."""
    configure_openmp_wait_policy()  # libgomp reads OMP_WAIT_POLICY once, when torch loads it: before that
    args = build_parser().parse_args(argv)
    # PEFTLAB_LOG_LEVEL wins over --quiet; a command whose stdout is its product keeps messages off it
    setup_logging("warning" if getattr(args, "quiet", False) else None,
                  messages_to_stderr=getattr(args, "messages_to_stderr", False))
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
