"""Refused writes of a run's output, beyond tests/trainer/test_failures.py: TensorBoard's event file refused mid-run
(the run trains to the end with one warning), an OSError naming its file as bytes (TensorBoard's writer does) or by an
atomic write's temporary name, and metrics.jsonl refused at its very first write, in a fresh run (its first log line)
and in a resumed one (rewritten to the checkpoint's step while the run is built)."""
from __future__ import annotations

import errno
import json
import os

import pytest
from disk_faults import FailingDisk
from helpers import short_run_recipe

from peftlab.errors import PeftlabError
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer import loop
from peftlab.trainer.failures import diagnose

pytestmark = pytest.mark.xdist_group("trainer")


def test_a_refused_write_naming_its_file_as_bytes_is_explained(tmp_path):
    path = tmp_path / "tensorboard" / "events.out.tfevents.1"
    failure = diagnose(OSError(errno.EROFS, "Read-only file system", os.fsencode(path)), tmp_path)
    assert failure is not None and failure.storage[:2] == (str(path), errno.EROFS)
    assert diagnose(OSError(errno.EROFS, "Read-only file system", os.fsencode(tmp_path.parent / "x")), tmp_path) is None
    assert diagnose(OSError(errno.EROFS, "Read-only file system", 7), tmp_path) is None  # a descriptor, not a path


def test_an_atomic_writes_temporary_is_named_by_its_target(tmp_path):
    tmp = tmp_path / f".metrics.jsonl.tmp-{os.getpid()}"
    assert diagnose(OSError(errno.ENOSPC, "No space left on device", str(tmp)), tmp_path).storage[0] == str(
        tmp_path / "metrics.jsonl")
    inside = tmp_path / "checkpoints" / ".step-0000004.tmp-9" / "adapter_model.safetensors"
    assert diagnose(OSError(errno.ENOSPC, "No space left on device", str(inside)), tmp_path).storage[0] == str(inside)


def test_tensorboard_refused_mid_run_the_run_trains_to_the_end(short_trainer, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    trainer = []
    disk = FailingDisk(monkeypatch, out / "tensorboard", errno.ENOSPC, when=lambda: bool(trainer) and trainer[0].state.step >= 2)
    trainer.append(short_trainer(out, train={"max_steps": 4}, output={"report_to": ["jsonl", "tensorboard"]}))
    capsys.readouterr()
    result = trainer[0].train()
    monkeypatch.undo()
    assert disk.refused >= 1 and result.state.step == 4
    err = capsys.readouterr().err  # quiet: warnings only
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "TensorBoard logging is off for the rest of this run" in warnings[0], err
    assert f"could not write {out / 'tensorboard'}" in warnings[0] and "at step 2: No space left on device" in warnings[0]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_metrics_refused_at_the_first_write_stops_with_the_write_failure(short_trainer, tmp_path, monkeypatch):
    out = tmp_path / "o"
    t = short_trainer(out, train={"max_steps": 2, "eval_at_start": True})
    FailingDisk(monkeypatch, out / "metrics.jsonl", errno.EROFS).fail_now()  # remounted read-only after the checks
    with pytest.raises(PeftlabError) as e:
        t.train()
    assert str(e.value) == (
        f"training stopped after step 0: could not write {out / 'metrics.jsonl'}: Read-only file system (errno "
        "EROFS); the filesystem is mounted read-only: remount it read-write, or choose an output.dir on a writable "
        "disk. No checkpoint was written yet (train.save_every sets how often), so the run must start over: rerun "
        "the same command once that is fixed")


def test_metrics_refused_while_a_resumed_run_is_built_names_the_file(short_trainer, short_data, tmp_path, monkeypatch):
    """Through peftlab.trainer.loop.train (what ``peftlab train`` runs): the OSError raised while the Trainer is
    built becomes the one message naming the file, not a traceback."""
    out = tmp_path / "o"
    short_trainer(out, train={"max_steps": 2}).train()
    recipe = recipe_from_dict(short_run_recipe(short_data, out, train={"max_steps": 3}, resume="auto"))
    for name in ("metrics.jsonl", ".metrics.jsonl"):  # the file and its atomic rewrite's temporary
        FailingDisk(monkeypatch, out / name, errno.EROFS).fail_now()
    with pytest.raises(PeftlabError) as e:
        loop.train(recipe, quiet=True)
    assert str(e.value) == (
        f"could not write {out / 'metrics.jsonl'} before training started: Read-only file system (errno EROFS); the "
        "filesystem is mounted read-only: remount it read-write, or choose an output.dir on a writable disk. Nothing "
        "was trained; rerun the same command once that is fixed")


def test_a_setup_failure_in_a_launched_run_names_its_rank(monkeypatch):
    """As failure_message does for a failed step: the message of a rank that failed while its run was built says
    which rank (the others stop with it, each naming the failed one)."""
    import errno as errno_codes

    from peftlab.trainer import failures

    storage = failures.Failure(storage=("/runs/x/metrics.jsonl", errno_codes.EROFS, "read-only", "remount it"))
    assert str(failures.setup_failure_message(storage, None)).startswith("could not write /runs/x/metrics.jsonl")
    monkeypatch.setattr(failures, "is_distributed", lambda: True)
    monkeypatch.setattr(failures, "rank", lambda: 3)
    assert str(failures.setup_failure_message(storage, None)).startswith(
        "rank 3: could not write /runs/x/metrics.jsonl before training started: read-only (errno EROFS); remount it")
    monkeypatch.setattr(failures, "out_of_memory_message", lambda recipe, memory, when: f"out of memory {when}")
    assert str(failures.setup_failure_message(failures.Failure(memory="CUDA out of memory"), None)) == (
        "rank 3: out of memory while loading the model and data Nothing was trained or written yet.")
