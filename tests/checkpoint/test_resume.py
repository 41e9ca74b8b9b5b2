"""Exact resume of real training processes: `peftlab train RECIPE --set resume=auto`, killed with SIGKILL
at seeded random points (mid-checkpoint included) and stopped once with SIGTERM, resumed each time,
reproduces the per-step losses, the data order and the final adapter of an uninterrupted run BIT FOR BIT
(fp32, LoRA dropout on). Kill points come from the PEFTLAB_TEST_KILL_AT hook of peftlab.checkpoint."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, make_quickstart_data, tiny_recipe_dict

from peftlab.checkpoint import store as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume")]

STEPS, SAVE_EVERY, N_FILES = 12, 2, 7          # 7 files per checkpoint (adapter x3, engine, rng, state, recipe)
SEED = int(os.environ.get("PEFTLAB_TEST_SEED", "20261122"))


def _recipe(tmp: Path, data: Path, out: Path) -> Path:
    raw = tiny_recipe_dict(
        data, out, quantization={"mode": "none"}, adapter={"dropout": 0.1}, data={"max_seq_len": 48},
        train={"max_steps": STEPS, "micro_batch_size": 4, "grad_accum": 2, "save_every": SAVE_EVERY,
               "eval_at_start": False},
        eval={"max_prompts": 1, "max_new_tokens": 2}, output={"report_to": ["jsonl"], "plot": False},
    )
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _launch(recipe: Path, trace: Path, cache: Path, **env: str) -> subprocess.Popen:
    # One thread: the same arithmetic in every process, and no spin-waiting on a shared 2-core machine.
    full = {**os.environ, "PEFTLAB_TEST_TRACE": str(trace), "PEFTLAB_DATA_CACHE": str(cache),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-P", "-m", "peftlab.cli.main", "train", str(recipe),
                             "--set", "resume=auto"], cwd=REPO, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _timeline() -> list[str]:
    """Every kill point of a run, in the order the run passes them."""
    points = []
    for s in range(1, STEPS + 1):
        points += [f"step-{s}-backward", f"step-{s}"]
        if s % SAVE_EVERY == 0 and s < STEPS:
            points += [f"save-{s}-file-{k}" for k in range(1, N_FILES + 1)] + [f"save-{s}-renamed", f"save-{s}-done"]
    return points


def _kill_points(rng: random.Random) -> list[str]:
    """Three SIGKILL points in run order: one mid-write, one between rename and marker, one anywhere."""
    line = _timeline()
    early = [p for p in line[: line.index("step-7")] if "-file-" in p]
    first = rng.choice(early)
    renamed = [p for p in line[line.index(first) + 1: line.index("step-8")] if p.endswith("-renamed")]
    second = rng.choice(renamed)
    # (then the SIGTERM segment resumes at step 8 at the latest and is signalled well before step 12)
    third = rng.choice(line[line.index(second) + 1: line.index("step-9")])
    return [first, second, third]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = make_quickstart_data(tmp / "data", n_train=40, n_eval=2)  # 5 steps per epoch: crosses 2 epochs
    cache = tmp / "cache"
    ref_recipe = _recipe(tmp, data, tmp / "reference")
    ref = _launch(ref_recipe, tmp / "reference.trace", cache)
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    rng = random.Random(SEED)
    points = _kill_points(rng)
    recipe = _recipe(tmp, data, tmp / "chain")
    trace = tmp / "chain.trace"
    segments = []
    for point in points:
        p = _launch(recipe, trace, cache, PEFTLAB_TEST_KILL_AT=point)
        out, err = p.communicate(timeout=300)
        segments.append({"kill_at": point, "rc": p.returncode, "out": out, "err": err})
    # SIGTERM from outside, while the run is busy (each step slowed down so the signal lands mid-run).
    start = len(_trace(trace))
    p = _launch(recipe, trace, cache, PEFTLAB_TEST_STEP_DELAY="0.4")
    deadline = time.monotonic() + 240
    while len(_trace(trace)) < start + 1 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    stepped_before_signal = _trace(trace)[-1]["step"]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    segments.append({"kill_at": "SIGTERM", "rc": p.returncode, "out": out, "err": err,
                     "signalled_after_step": stepped_before_signal, "trace_len": len(_trace(trace)),
                     "complete": [step for _, step in ckpt.scan(tmp / "chain" / "checkpoints")[0]]})
    p = _launch(recipe, trace, cache)
    out, err = p.communicate(timeout=300)
    segments.append({"kill_at": None, "rc": p.returncode, "out": out, "err": err})
    return {"tmp": tmp, "ref": tmp / "reference", "chain": tmp / "chain", "ref_trace": _trace(tmp / "reference.trace"),
            "trace": _trace(trace), "segments": segments, "points": points}


def _train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_kill9_anywhere_then_resume_is_bitwise_identical(runs):
    segs = runs["segments"]
    for s in segs[:3]:
        assert s["rc"] == -signal.SIGKILL, (s["kill_at"], s["err"][-2000:])
    assert segs[-1]["rc"] == 0, segs[-1]["err"][-3000:]
    assert "resuming from" in segs[2]["out"] and "resuming from" in segs[-1]["out"]
    # The kill between rename and marker left a directory without COMPLETE: named and skipped next time.
    renamed_step = int(runs["points"][1].split("-")[1])
    assert f"skipping checkpoint {runs['chain'] / 'checkpoints' / ckpt.checkpoint_name(renamed_step)}" in segs[2]["err"]

    ref = {r["step"]: r for r in runs["ref_trace"]}
    assert sorted(ref) == list(range(1, STEPS + 1))
    # Every step the chain ran — re-runs of steps lost to a kill included — drew the same samples and
    # computed the same loss (float.hex) as the uninterrupted run.
    assert len(runs["trace"]) > STEPS  # some steps were really recomputed
    for rec in runs["trace"]:
        assert rec == ref[rec["step"]], rec["step"]
    assert {r["step"] for r in runs["trace"]} == set(ref)
    # metrics.jsonl continues across restarts: each step once, same losses and gradient norms.
    got, want = _train_records(runs["chain"]), _train_records(runs["ref"])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in got] == [(r["loss"], r["grad_norm"], r["lr"]) for r in want]
    # The final adapters are the same bytes.
    name = "adapter/adapter_model.safetensors"
    assert (runs["chain"] / name).read_bytes() == (runs["ref"] / name).read_bytes()
    from safetensors.torch import load_file

    a, b = load_file(runs["chain"] / name), load_file(runs["ref"] / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Dropout was on (samples differ per step, so the RNG restore is what made this exact).
    assert yaml.safe_load((runs["chain"] / "adapter" / "peftlab_recipe.yaml").read_text())["adapter"]["dropout"] == 0.1


def test_sigterm_saves_a_resumable_checkpoint_and_exits_0(runs):
    seg = next(s for s in runs["segments"] if s["kill_at"] == "SIGTERM")
    assert seg["rc"] == 0, seg["err"][-3000:]
    assert "SIGTERM received: saving a checkpoint at the end of this step" in seg["err"]
    trace = runs["trace"][: seg["trace_len"]]
    stopped_at = trace[-1]["step"]
    assert stopped_at < STEPS and stopped_at >= seg["signalled_after_step"]
    path = runs["chain"] / "checkpoints" / ckpt.checkpoint_name(stopped_at)
    assert f"stopped by SIGTERM at step {stopped_at}; checkpoint {path}" in seg["out"]
    assert seg["complete"][-1] == stopped_at  # complete and verified (hashes) right after the exit
    # The last segment resumed exactly from that checkpoint (which then counts toward keep_last).
    assert f"resuming from {path} (step {stopped_at}," in runs["segments"][-1]["out"]
    assert runs["trace"][seg["trace_len"]]["step"] == stopped_at + 1


def test_keep_last_rotation_and_no_leftovers(runs):
    root = runs["chain"] / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    complete, broken = ckpt.scan(root)
    assert len(complete) == 3 and not broken, names  # keep_last: 3; crashed saves cleaned up
    assert not [n for n in names if n.startswith(".")]


# ---- the real errno of an unwritable output directory, at the start and mid-run ---------------------------------


def _obeying_file_permissions() -> list[str]:
    """A command prefix under which a subprocess obeys file permissions. Root ignores them (CAP_DAC_OVERRIDE):
    setpriv drops that capability from the child's bounding set, so a chmod makes the real EACCES."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, which ignores file permissions, and setpriv (util-linux) is missing")
    prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]
    if subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE here (setpriv failed)")
    return prefix


def test_unwritable_output_dir_stops_with_a_message_at_start_and_mid_run(tmp_path):
    prefix = _obeying_file_permissions()
    data = make_quickstart_data(tmp_path / "data", n_train=40, n_eval=2)
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, data, out)
    trace, cache = tmp_path / "run.trace", tmp_path / "cache"

    def launch(**env: str) -> subprocess.Popen:
        full = {**os.environ, "PEFTLAB_TEST_TRACE": str(trace), "PEFTLAB_DATA_CACHE": str(cache),
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
        return subprocess.Popen([*prefix, sys.executable, "-P", "-m", "peftlab.cli.main", "train", str(recipe),
                                 "--set", "resume=auto"], cwd=REPO, env=full, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    # At the start: output.dir exists and may not be written.
    out.mkdir()
    out.chmod(0o555)
    p = launch()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    assert f"peftlab: error: output.dir {out} is not writable (Permission denied): this user may not write there" in err
    assert "Traceback" not in err and list(out.iterdir()) == []
    out.chmod(0o755)

    # Mid-run: metrics.jsonl turns read-only once step 3 has run (the checkpoint of step 2 is complete).
    p = launch(PEFTLAB_TEST_STEP_DELAY="0.3")
    deadline = time.monotonic() + 240
    while not [r for r in _trace(trace) if r["step"] >= 3] and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    (out / "metrics.jsonl").chmod(0o444)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]
    m = re.search(r"peftlab: error: training stopped after step (\d+): could not write (\S+): Permission denied "
                  r"\(errno EACCES\); this user may not write there.* The last complete checkpoint (\S+) \(step (\d+)\) "
                  r"is intact; once that is fixed, continue with: peftlab train RECIPE --set resume=auto", err)
    assert m, err[-3000:]
    stopped, path, last, last_step = int(m[1]), m[2], Path(m[3]), int(m[4])
    assert path == str(out / "metrics.jsonl") and "Traceback" not in err
    # step N is logged before it is saved: the failed log of step N leaves the save before it as the last one
    assert stopped >= 3 and last_step == (stopped - 1) - (stopped - 1) % SAVE_EVERY and ckpt.verify(last) is None
    assert ckpt.latest_complete(out / "checkpoints") == last

    (out / "metrics.jsonl").chmod(0o644)
    p = launch()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert [r["step"] for r in _train_records(out)] == list(range(1, STEPS + 1))
