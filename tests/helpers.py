"""Shared builders for tests: recipes over the built-in models and generated quickstart data."""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def make_quickstart_data(out: Path, n_train: int = 64, n_eval: int = 16, seed: int = 1234) -> Path:
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import make_quickstart_data as gen
    finally:
        sys.path.pop(0)
    train, held_out = gen.generate(n_train, n_eval, seed)
    gen.write_jsonl(train, out / "train.jsonl")
    gen.write_jsonl(held_out, out / "eval.jsonl")
    return out


def tiny_recipe_dict(data_dir: Path, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A fast recipe: micro-llama, NF4, LoRA r=8 on all linear layers, small batches."""
    raw: dict[str, Any] = {
        "model": {"name": "builtin:micro-llama"},
        "quantization": {"mode": "nf4"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(data_dir / "train.jsonl"), "format": "messages"}],
                 "eval": [{"path": str(data_dir / "eval.jsonl"), "format": "messages"}],
                 "max_seq_len": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "log_every": 1,
                  "seed": 7, "warmup_steps": 0},
        "eval": {"metric": "loss", "max_prompts": 4, "max_new_tokens": 4},
        "output": {"dir": str(out_dir), "report_to": ["jsonl", "tensorboard"]},
    }
    return with_sections(raw, sections)


def with_sections(raw: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with each of ``sections`` merged into its section (a dict) or set (a top-level value); returned."""
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


# ---- multi-process runs (torchrun / the DeepSpeed launcher on CPU, gloo) ----

TORCHRUN_TIMEOUT_S = 300


def profiled_peak(fn) -> int:
    """Peak of the CPU tensor bytes allocated while ``fn`` runs (torch.profiler's memory events: allocations and
    frees in time order) — what the memory planner's working-set terms are checked against."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def _without_mlflow() -> str:
    """A folder whose ``mlflow`` package fails to import, for the front of PYTHONPATH.

    ``import deepspeed`` imports mlflow whenever it is installed (deepspeed/autotuning/autotuner.py, an optional
    ``try: import mlflow``): measured ~2.1 s wall / ~1.3 s CPU per process on the CI machine class (4.2 s against
    2.0 s for ``import deepspeed``), paid by every rank, launcher and runner of the multi-process DeepSpeed tests.
    mlflow is in the dev extras only for the tracker tests (in process); none of these runs reports to it, and
    DeepSpeed's autotuner is never used, so those processes run as they do where mlflow is not installed."""
    root = Path(tempfile.mkdtemp(prefix="peftlab-tests-no-mlflow-"))
    atexit.register(shutil.rmtree, root, True)
    (root / "mlflow").mkdir()
    (root / "mlflow" / "__init__.py").write_text(
        'raise ImportError("mlflow is hidden from this test subprocess (tests/helpers.py: _without_mlflow)")\n')
    return str(root)


def subprocess_env() -> dict[str, str]:
    """The environment of the tests' multi-process runs (torchrun, peftlab launch): one thread, offline, mlflow
    hidden (see :func:`_without_mlflow`)."""
    env = dict(os.environ)
    env.update(PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PEFTLAB_JOIN_TIMEOUT="60")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_without_mlflow(), env.get("PYTHONPATH")) if p)
    return env


def ds_config(name: str) -> str:
    return str(REPO / "recipes" / "deepspeed" / f"{name}.json")


ZERO_STEPS = 10


def zero_recipe_raw(data_dir: Path, out: Path, *, grad_accum: int, deepspeed: str | None = None,
                    quant: dict | None = None, **train: Any) -> dict[str, Any]:
    """The DeepSpeed tests' run: micro-llama (fp32 unless ``quant``), micro-batch 2, ZERO_STEPS steps, eval loss,
    jsonl metrics. tests/engine/conftest.py's ``zero_run`` trains it once per ZeRO stage for several tests."""
    raw = tiny_recipe_dict(data_dir, out, quantization=quant or {"mode": "none"},
                           train={"max_steps": ZERO_STEPS, "grad_accum": grad_accum, "micro_batch_size": 2,
                                  "eval_at_start": False, **train},
                           output={"report_to": ["jsonl"], "plot": False}, eval={"metric": "loss"})
    if deepspeed:
        raw["deepspeed"] = deepspeed
    return raw


def torchrun_train(tmp: Path, recipe: Path, *extra: str, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """`peftlab train RECIPE` on ``nproc`` local ranks under torchrun (gloo); the caller checks the exit status."""
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "-m", "peftlab.cli.main", "train", str(recipe), "--quiet", *extra]
    return subprocess.run(cmd, cwd=tmp, env={**subprocess_env(), **env}, capture_output=True, text=True,
                          timeout=TORCHRUN_TIMEOUT_S, check=False)


def train_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def short_run_recipe(data_dir: Path, out: Path, **sections) -> dict:
    """3 steps of micro-batch 4 in fp32 with LoRA dropout, a checkpoint after every step, jsonl metrics only."""
    train = {"max_steps": 3, "micro_batch_size": 4, "grad_accum": 1, "save_every": 1, "eval_at_start": False,
             **sections.pop("train", {})}
    resume = sections.pop("resume", None)
    adapter = {"dropout": 0.1, **sections.pop("adapter", {})}
    output = {"report_to": ["jsonl"], "plot": False, **sections.pop("output", {})}
    raw = tiny_recipe_dict(data_dir, out, quantization={"mode": "none"}, adapter=adapter, data={"max_seq_len": 48},
                           train=train, eval={"max_prompts": 1, "max_new_tokens": 2}, output=output, **sections)
    return {**raw, "resume": resume}
