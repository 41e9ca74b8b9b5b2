"""CPU training steps under OpenMP thread counts and wait policies, on an idle and on a busy machine.

Why: torch's OpenMP runtime (libgomp) spins waiting threads by default; on a machine whose cores are shared
with other work a spinning thread holds a core its descheduled sibling needs, and a 2-thread step of the
quickstart model went from ~0.3 s to 5–16 s. peftlab's CLI sets ``OMP_WAIT_POLICY=passive`` before torch
loads (peftlab/hostmem.py); this benchmark is the measurement behind that choice.

Each setting runs in its own process (the policy must be in the environment before torch is imported), builds
the quickstart recipe's Trainer and times ``train_step`` (one warm-up, then the median of ``--steps``).
Settings are interleaved round by round so drifting background load hits all of them alike. Load: ``idle``
(nothing added), ``busy`` (one ``while True`` process per core), ``heavy`` (two per core).

    python -P bench/bench_cpu_threads.py                 # all settings x loads x 3 rounds (~10 min, 2 cores)
    python -P bench/bench_cpu_threads.py --smoke         # one setting, one round, idle (the suite runs this)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, append_jsonl, print_table

WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SETTINGS: dict[str, tuple[int, dict[str, str]]] = {
    "1 thread": (1, {}),
    "2 threads, libgomp default": (2, {}),
    "2 threads, passive": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "2 threads, GOMP_SPINCOUNT=1000": (2, {"GOMP_SPINCOUNT": "1000"}),
}
LOADS = {"idle": 0, "busy": 1, "heavy": 2}

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {recipes!r})
import make_quickstart_data as gen
from peftlab.recipe.parse import load_recipe
from peftlab.trainer.loop import Trainer

threads, steps, work = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
torch.set_num_threads(threads)
train, held_out = gen.generate(256, 4, 1234)
gen.write_jsonl(train, work / "data" / "train.jsonl")
gen.write_jsonl(held_out, work / "data" / "eval.jsonl")
recipe = load_recipe({recipe!r}, overrides=[
    "data.train=[" + json.dumps({{"path": str(work / "data" / "train.jsonl"), "format": "messages"}}) + "]",
    "data.eval=[" + json.dumps({{"path": str(work / "data" / "eval.jsonl"), "format": "messages"}}) + "]",
    "output.dir=" + str(work / "out"), "train.max_steps=" + str(steps + 2), "train.eval_at_start=false",
    "output.report_to=[]", "output.plot=false", "train.threads=" + str(threads)])
trainer = Trainer(recipe, quiet=True)
trainer.train_step()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    trainer.train_step()
    times.append(time.perf_counter() - t0)
print(json.dumps({{"threads": torch.get_num_threads(), "times_s": times}}))
"""


def run_setting(threads: int, env_extra: dict[str, str], steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_ENV and k != "OMP_NUM_THREADS"}
    env.update(env_extra)
    script = CHILD.format(recipes=str(REPO_ROOT / "recipes"), recipe=str(REPO_ROOT / "recipes" / "quickstart.yaml"))
    with tempfile.TemporaryDirectory(prefix="peftlab-threads-") as work:
        p = subprocess.run([sys.executable, "-P", "-c", script, str(threads), str(steps), work], env=env,
                           capture_output=True, text=True, timeout=1800, check=False)
    if p.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def start_load(per_core: int) -> list[subprocess.Popen]:
    n = per_core * (os.cpu_count() or 1)
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--loads", nargs="+", default=list(LOADS), choices=list(LOADS))
    ap.add_argument("--smoke", action="store_true", help="one setting, one round, 2 steps, idle")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    settings = dict(SETTINGS)
    if args.smoke:
        settings = {"2 threads, passive": SETTINGS["2 threads, passive"]}
        args.rounds, args.steps, args.loads = 1, 2, ["idle"]
    rows = []
    for load in args.loads:
        medians: dict[str, list[float]] = {name: [] for name in settings}
        worst: dict[str, float] = dict.fromkeys(settings, 0.0)
        hogs = start_load(LOADS[load])
        try:
            time.sleep(1.0 if hogs else 0.0)
            for _ in range(args.rounds):
                for name, (threads, env_extra) in settings.items():
                    times = run_setting(threads, env_extra, args.steps)["times_s"]
                    medians[name].append(statistics.median(times))
                    worst[name] = max(worst[name], max(times))
        finally:
            for h in hogs:
                h.kill()
        for name in settings:
            row = {"load": load, "setting": name, "median_s_per_round": [round(x, 3) for x in medians[name]],
                   "median_s": round(statistics.median(medians[name]), 3), "worst_step_s": round(worst[name], 3),
                   "steps": args.steps, "rounds": args.rounds, "smoke": args.smoke}
            append_jsonl("bench_cpu_threads", row, args.results_dir)
            rows.append(row)
    print_table(rows, ["load", "setting", "median_s_per_round", "median_s", "worst_step_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
