"""Resuming. In process: which checkpoint `resume: auto` picks (damaged ones skipped and named, none when every
completed one is damaged), what it restores (weights, optimizer, position) and what it refuses (recipe changes
that break the run, other data). End to end: `peftlab train RECIPE --set resume=auto`, killed with SIGKILL
at seeded random points (mid-checkpoint included) and stopped once with SIGTERM, resumed each time,
reproduces the per-step losses, the data order and the final adapter of an uninterrupted run BIT FOR BIT
(fp32, LoRA dropout on). Kill points come from peftlab.trainer.fault_injection (PEFTLAB_TEST_KILL_AT)."""
from __future__ import annotations

import json
import os
import random
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

from peftlab.adapters.peft_format import lora_state_dict
from peftlab.checkpoint import store as ckpt
from peftlab.checkpoint.resume import load_checkpoint, recipe_differences
from peftlab.errors import PeftlabError
from peftlab.metrics.console import setup_logging
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

pytestmark = pytest.mark.xdist_group("resume")

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_keep_last_rotation_and_no_leftovers(runs):
    root = runs["chain"] / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    complete, broken = ckpt.scan(root)
    assert len(complete) == 3 and not broken, names  # keep_last: 3; crashed saves cleaned up
    assert not [n for n in names if n.startswith(".")]


# ---- in process: which checkpoint, what is restored, what is refused ------------------------------------------


@pytest.fixture
def err_log():
    setup_logging("info")  # warnings reach stderr whatever a quiet run before this one set


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-marker"])
def test_corrupt_newest_checkpoint_is_skipped(make_trainer, run_copy, capsys, err_log, damage):
    newest = run_copy / "checkpoints" / "step-0000002"
    if damage == "truncate":
        data = (newest / "engine.pt").read_bytes()
        (newest / "engine.pt").write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f = newest / "adapter" / "adapter_model.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        (newest / ckpt.MARKER).unlink()
    t = make_trainer(run_copy, resume="auto")
    assert t.resumed_from == run_copy / "checkpoints" / "step-0000001"
    assert t.state.step == 1 and t.state.micro_index == 1
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in err
    assert {"truncate": "engine.pt is truncated", "flip": "does not match its checksum",
            "no-marker": "no COMPLETE marker"}[damage] in err
    with pytest.raises(PeftlabError, match="is not a usable checkpoint"):
        make_trainer(run_copy, resume=str(newest))


def test_resume_restores_weights_optimizer_and_position(make_trainer, run_copy):
    t = make_trainer(run_copy, resume=str(run_copy / "checkpoints" / "step-0000002"))
    saved = load_checkpoint(run_copy / "checkpoints" / "step-0000002")
    for k, v in lora_state_dict(t.model).items():
        assert torch.equal(v, saved.adapter_weights[k])
    opt = t.engine.optimizer.state_dict()
    for i, s in saved.engine_state["optimizer"]["state"].items():
        assert torch.equal(opt["state"][i]["exp_avg"], s["exp_avg"]) and float(opt["state"][i]["step"]) == 2
    assert t.engine.lr == saved.engine_state["optimizer"]["param_groups"][0]["lr"]
    assert (t.state.step, t.state.epoch, t.state.micro_index) == (2, 0, 2)
    assert set(t._resume_rng) == {"python", "numpy", "torch", "cuda"}  # restored right before the first step


def test_recipe_change_that_breaks_resume_is_refused(make_trainer, run_copy, capsys, err_log):
    with pytest.raises(PeftlabError) as e:
        make_trainer(run_copy, resume="auto", adapter={"r": 4}, train={"micro_batch_size": 2, "seed": 8})
    msg = str(e.value)
    assert "would make the resumed run wrong" in msg
    for line in ("adapter.r: 8 -> 4", "train.micro_batch_size: 4 -> 2", "train.seed: 7 -> 8"):
        assert line in msg
    # lr / max_steps may change (lowering lr after a spike): named, and applied from the next step on.
    t = make_trainer(run_copy, resume="auto", train={"lr": 1e-3, "max_steps": 5})
    assert "train.lr: 0.003 -> 0.001" in capsys.readouterr().err
    assert t.engine.optimizer.param_groups[0]["initial_lr"] == 1e-3 and t.total_steps == 5


def test_recipe_differences_lock_what_the_run_computes():
    saved = {"model": {"name": "a", "dtype": "float32"}, "train": {"lr": 1e-3, "seed": 1, "log_every": 10},
             "output": {"dir": "x"}, "adapter": {"r": 8, "alpha": 16}}
    current = {"model": {"name": "a", "dtype": "bfloat16"}, "train": {"lr": 5e-4, "seed": 1, "log_every": 1},
               "output": {"dir": "y"}, "adapter": {"r": 8, "alpha": 32}}
    refused, other = recipe_differences(saved, current)
    assert refused == ["adapter.alpha: 16 -> 32", "model.dtype: 'float32' -> 'bfloat16'"]
    assert other == ["train.lr: 0.001 -> 0.0005"]  # output.* and train.log_every change silently


def test_changed_training_data_is_refused(make_trainer, data_dir, ck_recipe, run_copy, tmp_path):
    other = make_quickstart_data(tmp_path / "other", n_train=24, n_eval=2, seed=99)
    raw = ck_recipe(data_dir, run_copy, resume="auto")
    shutil.copy(other / "train.jsonl", tmp_path / "train.jsonl")
    raw["data"]["train"][0]["path"] = str(tmp_path / "train.jsonl")
    with pytest.raises(PeftlabError, match="data.train"):  # the path changed: refused as a recipe key
        Trainer(recipe_from_dict(raw), quiet=True)
    (data_dir / "train.jsonl").rename(data_dir / "train.jsonl.bak")
    try:
        shutil.copy(other / "train.jsonl", data_dir / "train.jsonl")  # same path, other content
        with pytest.raises(PeftlabError, match="tokenized training data differ"):
            make_trainer(run_copy, resume="auto")
    finally:
        (data_dir / "train.jsonl.bak").replace(data_dir / "train.jsonl")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(make_trainer, run_copy):
    root = run_copy / "checkpoints"
    _truncate(root / "step-0000001" / "engine.pt")
    f = root / "step-0000002" / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")  # same size, other content
    metrics = (run_copy / "metrics.jsonl").read_bytes()
    with pytest.raises(PeftlabError) as e:
        make_trainer(run_copy, resume="auto")
    msg = str(e.value)
    assert msg.startswith(f"resume: auto found no usable checkpoint in {root}")
    assert f"{root / 'step-0000001'}: engine.pt is truncated" in msg
    assert f"{root / 'step-0000002'}: adapter/adapter_model.safetensors does not match its checksum" in msg
    assert "Nothing was changed or deleted" in msg and "resume: PATH" in msg
    assert "resume: null and output.overwrite: true" in msg
    # nothing was deleted: the old metrics and both (damaged) checkpoints are as they were
    assert (run_copy / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002"]
    # starting over as the message says: the damaged checkpoints and the old metrics go
    t = make_trainer(run_copy, output={"overwrite": True})
    assert t.state.step == 0 and t.resumed_from is None
    assert not (run_copy / "metrics.jsonl").exists() and list(root.iterdir()) == []


def test_resume_auto_starts_over_when_only_interrupted_saves_exist(data_dir, ck_recipe, run_copy, capsys, err_log):
    """A save killed before its COMPLETE marker never was a checkpoint: step 0, with a warning, as before."""
    root = run_copy / "checkpoints"
    for step in ("step-0000001", "step-0000002"):
        (root / step / ckpt.MARKER).unlink()
    t = Trainer(recipe_from_dict(ck_recipe(data_dir, run_copy, resume="auto")), quiet=False)
    assert t.state.step == 0 and t.resumed_from is None
    said = capsys.readouterr()
    assert "no COMPLETE marker" in said.err
    assert f"resume: auto — no complete checkpoint in {root}; starting at step 0" in said.out


def test_resumed_metrics_keep_the_records_up_to_the_checkpoint(make_trainer, run_copy):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(x)["step"] for x in lines) == 3
    (run_copy / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "split": "tr')  # cut by a crash
    make_trainer(run_copy, resume=str(run_copy / "checkpoints" / "step-0000001"))
    kept = [json.loads(x) for x in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert kept and all(r["step"] <= 1 for r in kept)
    assert kept == [json.loads(x) for x in lines if json.loads(x)["step"] <= 1]
