"""ZeRO-2 vs ZeRO-3 vs one process: optimizer steps/s and peak memory per rank (not a test).

Each configuration trains the same recipe (the built-in micro/tiny Llama, LoRA, fp32) for a fixed
number of steps with the same GLOBAL batch: one process accumulates ``world x grad_accum``
micro-batches, each of the 2 DeepSpeed ranks ``grad_accum``. Every rank reports its peak resident
set size (VmHWM: on CPU the whole process — weights, activations, DeepSpeed buffers) and the
steps/s of ``Trainer.train()`` (the loop, one 4-row eval and the adapter save).

    .venv/bin/python -P bench/bench_zero.py [--model builtin:tiny-llama] [--steps 20] [--smoke]

Results are appended to ``bench/results/bench_zero.jsonl`` and printed as a table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, append_jsonl

from peftlab.engine.planner import peak_rss_bytes


def worker(recipe_path: str, report: str) -> None:
    """Runs inside every rank: train, then write this rank's figures."""
    from peftlab.engine.process_group import shutdown_distributed
    from peftlab.recipe.parse import load_recipe
    from peftlab.trainer.loop import Trainer

    trainer = Trainer(load_recipe(recipe_path), quiet=True)
    t0 = time.perf_counter()
    result = trainer.train()  # the loop plus one small final eval (4 rows) and the adapter save
    elapsed = time.perf_counter() - t0
    rank = trainer.dist.rank
    Path(f"{report}.{rank}").write_text(json.dumps({
        "rank": rank, "steps": result.state.step, "train_time_s": elapsed,
        "steps_per_s": result.state.step / elapsed,
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "final_loss": result.losses[-1]}))
    shutdown_distributed()  # as the CLI does: gloo's threads torn down by the interpreter can abort a finished rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, *, model: str, steps: int, nproc: int, deepspeed: str | None, work: Path, mbs: int,
        seq: int) -> list[dict]:
    import yaml

    data = work / "data"
    if not (data / "train.jsonl").is_file():  # the quickstart's generated rows (recipes/make_quickstart_data.py)
        sys.path.insert(0, str(REPO_ROOT / "recipes"))
        try:
            import make_quickstart_data as gen
        finally:
            sys.path.pop(0)
        train, held_out = gen.generate(256, 4, 1234)
        gen.write_jsonl(train, data / "train.jsonl")
        gen.write_jsonl(held_out, data / "eval.jsonl")
    raw = {"model": {"name": model}, "quantization": {"mode": "none"},
           "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
           "data": {"train": [{"path": str(data / "train.jsonl"), "format": "messages"}],
                    "eval": [{"path": str(data / "eval.jsonl"), "format": "messages"}], "max_seq_len": seq},
           "train": {"max_steps": steps, "micro_batch_size": mbs, "grad_accum": 2 // nproc, "lr": 3e-3,
                     "warmup_steps": 0, "seed": 7, "eval_at_start": False, "log_every": 1000},
           "eval": {"metric": "loss", "max_prompts": 4, "max_new_tokens": 4},
           "output": {"dir": str(work / f"out-{name}"), "report_to": [], "plot": False, "overwrite": True}}
    if deepspeed:
        raw["deepspeed"] = str(REPO_ROOT / "recipes" / "deepspeed" / f"{deepspeed}.json")
    recipe = work / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    report = work / f"{name}.report"
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1",  # one thread per process: a shared 2-core box oversubscribes otherwise
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    me = [str(Path(__file__).resolve()), "--worker", str(recipe), str(report)]
    if nproc == 1:
        cmd = [sys.executable, "-P", *me]
    else:
        cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *me]
    proc = subprocess.run(cmd, check=False, env=env, cwd=work, timeout=1800, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-12000:]}")
    return [json.loads(Path(f"{report}.{r}").read_text()) for r in range(nproc)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=2, metavar=("RECIPE", "REPORT"), help=argparse.SUPPRESS)
    p.add_argument("--model", default="builtin:tiny-llama")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="micro-llama, 3 steps (checks the script runs)")
    p.add_argument("--results-dir", default=None, help="where bench_zero.jsonl goes (smoke runs: only there)")
    args = p.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    if args.smoke:
        args.model, args.steps, args.seq = "builtin:micro-llama", 3, 64
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-zero-") as tmp:
        for name, nproc, ds in (("single", 1, None), ("zero2", 2, "zero2"), ("zero3", 2, "zero3")):
            ranks = run(name, model=args.model, steps=args.steps, nproc=nproc, deepspeed=ds, work=Path(tmp),
                        mbs=args.micro_batch, seq=args.seq)
            row = {"config": name, "processes": nproc, "model": args.model, "steps": args.steps,
                   "global_batch": 2 * args.micro_batch, "max_seq_len": args.seq,
                   "steps_per_s": min(r["steps_per_s"] for r in ranks),
                   "peak_rss_mib_per_rank": [round(r["peak_rss_mib"], 1) for r in ranks],
                   "final_loss": ranks[0]["final_loss"]}
            rows.append(row)
            if not args.smoke or args.results_dir:
                append_jsonl("bench_zero", {**row, "smoke": args.smoke}, args.results_dir)
    print(f"{'config':8} {'procs':>5} {'steps/s':>8} {'peak RSS / rank (MiB)':>24} {'final loss':>10}")
    for r in rows:
        rss = ", ".join(f"{x:.0f}" for x in r["peak_rss_mib_per_rank"])
        print(f"{r['config']:8} {r['processes']:>5} {r['steps_per_s']:>8.2f} {rss:>24} {r['final_loss']:>10.4f}")


if __name__ == "__main__":
    main()
