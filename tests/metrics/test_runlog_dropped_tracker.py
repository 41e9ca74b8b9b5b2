"""An experiment tracker dropped after a failure ends its run as failed (MLflow status FAILED, W&B exit code 1),
not finished: its records stop at the failing step. Its closer for the failure watch is unregistered, and a
tracker whose store refuses that too is still dropped with one warning while the run goes on."""
from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from peftlab.engine import rank_failure
from peftlab.metrics import trackers
from peftlab.metrics.runlog import RunLog


class _Client:
    """An MlflowClient stand-in whose store is locked from step 2 (a reader such as ``mlflow ui`` holds it)."""

    def __init__(self, refuse_terminate: bool = False):
        self.steps: list[int] = []
        self.terminated: list[tuple[str, str]] = []
        self.refuse_terminate = refuse_terminate

    def log_batch(self, run_id, metrics=()):
        steps = {m.step for m in metrics}
        if max(steps) >= 2:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        self.steps.extend(sorted(steps))

    def set_terminated(self, run_id, status="FINISHED"):
        if self.refuse_terminate:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        self.terminated.append((run_id, status))


class _MLflow(trackers.MLflowTracker):
    def __init__(self, client):  # the real log/stopped/close of MLflowTracker, on a stand-in client
        self.client, self.run_id = client, "run-1"
        self._watch()


class _WandbRun:
    def __init__(self):
        self.steps: list[int] = []
        self.finished: list[int | None] = []

    def log(self, values, step):
        if step >= 2:
            raise OSError(28, "No space left on device")
        self.steps.append(step)

    def finish(self, exit_code=None):
        self.finished.append(exit_code)


class _Wandb(trackers.WandbTracker):
    def __init__(self, run):
        self.run = run
        self._watch()


def _registered(tracker) -> bool:
    return any(getattr(c, "__self__", None) is tracker for c in rank_failure._closers.values())


def _run(tmp_path, monkeypatch, caplog, tracker):
    monkeypatch.setattr(trackers, "build_trackers", lambda *a, **k: [tracker])
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        log = RunLog(tmp_path, ["jsonl", "mlflow", "wandb"])
        for step in (1, 2, 3):
            log.log(step, "train", {"loss": 1.0 / step})
        log.log_artifact(tmp_path / "metrics.jsonl", "metrics")
        log.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_dropped_mlflow_tracker_ends_its_run_as_failed(tmp_path, monkeypatch, caplog):
    client = _Client()
    tracker = _MLflow(client)
    assert _registered(tracker)
    warnings = _run(tmp_path, monkeypatch, caplog, tracker)
    assert len(warnings) == 1 and warnings[0].startswith(
        "mlflow reporting is off for the rest of this run: log failed at step 2 (RuntimeError: "), warnings
    assert client.steps == [1]
    assert client.terminated == [("run-1", "FAILED")]  # once, and not FINISHED: its metrics stop at step 1
    assert not _registered(tracker)  # the failure watch will not end it a second time


def test_a_dropped_wandb_tracker_finishes_its_run_with_exit_code_1(tmp_path, monkeypatch, caplog):
    run = _WandbRun()
    tracker = _Wandb(run)
    warnings = _run(tmp_path, monkeypatch, caplog, tracker)
    assert len(warnings) == 1 and warnings[0].startswith(
        "wandb reporting is off for the rest of this run: log failed at step 2 (OSError: "), warnings
    assert run.steps == [1] and run.finished == [1]
    assert not _registered(tracker)


def test_a_dropped_tracker_whose_store_refuses_the_failed_status_too_is_still_dropped_quietly(
        tmp_path, monkeypatch, caplog):
    client = _Client(refuse_terminate=True)
    tracker = _MLflow(client)
    warnings = _run(tmp_path, monkeypatch, caplog, tracker)
    assert len(warnings) == 1 and "log failed at step 2" in warnings[0], warnings
    assert client.steps == [1] and client.terminated == []
    assert not _registered(tracker)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow is not installed (pip install mlflow; it is in the dev extra)")
def test_a_real_mlflow_run_dropped_at_step_2_is_failed_in_the_store(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    with caplog.at_level(logging.WARNING, logger="peftlab"):
        log = RunLog(tmp_path, ["jsonl", "mlflow"], params={"train": {"lr": 0.5}}, run_name="r")
        (tracker,) = log._trackers
        log_batch = tracker.client.log_batch

        def locked_from_step_2(run_id, metrics=(), **kwargs):
            if any(m.step >= 2 for m in metrics):
                raise RuntimeError("(sqlite3.OperationalError) database is locked")
            return log_batch(run_id, metrics=metrics, **kwargs)

        tracker.client.log_batch = locked_from_step_2  # this instance only
        for step in (1, 2, 3):
            log.log(step, "train", {"loss": 1.0 / step})
        log.close()
    client = MlflowClient(tracking_uri=trackers.mlflow_tracking_uri(tmp_path))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
