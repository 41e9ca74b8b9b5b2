"""The run log when the disk refuses TensorBoard's event file mid-run (full disk, read-only remount): one warning
naming the file, the reason and the fix; TensorBoard off for the rest of the run; metrics.jsonl keeps every record;
no exception reaches the caller and no background thread dies with a traceback."""
from __future__ import annotations

import errno
import json
import logging
import threading

import pytest
from disk_faults import FailingDisk

from peftlab.metrics.runlog import RunLog


@pytest.fixture
def thread_failures(monkeypatch):
    """Exceptions that killed a thread during the test (threading prints them as a raw traceback)."""
    seen: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    return seen


@pytest.mark.parametrize("code, why, fix", [
    (errno.ENOSPC, "No space left on device (errno ENOSPC)", "free disk space"),
    (errno.EROFS, "Read-only file system (errno EROFS)", "the filesystem is mounted read-only"),
])
def test_a_refused_tensorboard_write_turns_tensorboard_off_and_the_run_goes_on(
        tmp_path, monkeypatch, caplog, thread_failures, code, why, fix):
    tb = tmp_path / "tensorboard"
    disk = FailingDisk(monkeypatch, tb, code)
    log = RunLog(tmp_path, ["jsonl", "tensorboard"])
    log.log(1, "train", {"loss": 2.5})
    disk.fail_now()
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        for step in (2, 3, 4):
            log.log(step, "train", {"loss": 2.5 / step})
        log.close()
    monkeypatch.undo()
    assert disk.refused >= 1
    assert thread_failures == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    msg = warnings[0]
    assert msg.startswith(f"TensorBoard logging is off for the rest of this run: could not write {tb}")
    assert f"at step 2: {why}; {fix}" in msg
    assert msg.endswith("training goes on; metrics.jsonl, checkpoints and the adapter are written as before "
                        "(TensorBoard holds the steps before 2)")
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tb))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5)]


def test_tensorboard_that_cannot_start_is_skipped_with_one_warning(tmp_path, caplog, thread_failures):
    (tmp_path / "tensorboard").write_text("a file in the way")
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        log = RunLog(tmp_path, ["jsonl", "tensorboard"])
        log.log(1, "train", {"loss": 1.0})
        log.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"TensorBoard logging is off for the rest of this run: could not write {tmp_path / 'tensorboard'} at the "
        "start: "), warnings
    assert "File exists (errno EEXIST); a file is in the way of that directory: move it away; training goes on" in (
        warnings[0])
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_without_jsonl_the_warning_does_not_promise_metrics_jsonl(tmp_path, monkeypatch, caplog):
    FailingDisk(monkeypatch, tmp_path / "tensorboard", errno.EACCES).fail_now()
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        log = RunLog(tmp_path, ["tensorboard"])
        log.log(1, "train", {"loss": 1.0})
        log.close()
    monkeypatch.undo()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "at the start: Permission denied (errno EACCES); this user may not write there" in (
        warnings[0]) and warnings[0].endswith("training goes on; checkpoints and the adapter are written as before")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_failing_experiment_tracker_is_dropped_with_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    from peftlab.metrics import trackers

    class LockedStore(trackers.MLflowTracker):  # an MLflow store that a reader (mlflow ui) holds locked from step 2
        def __init__(self, *args, **kwargs):
            self.logged, self.closed, self.stops = [], 0, 0
            self._unregister = lambda: None  # no failure watch in this test

        def stopped(self):
            self.stops += 1

        def log(self, step, split, figures):
            if step >= 2:
                raise RuntimeError("(sqlite3.OperationalError) database is locked\n[SQL: INSERT INTO metrics ...]")
            self.logged.append(step)

        def log_artifact(self, path, name):
            raise AssertionError("a dropped tracker gets nothing more")

        def close(self):
            self.closed += 1

    store = LockedStore()
    monkeypatch.setattr(trackers, "build_trackers", lambda *a, **k: [store])
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        log = RunLog(tmp_path, ["jsonl", "mlflow"])
        for step in (1, 2, 3):
            log.log(step, "train", {"loss": 1.0 / step})
        log.log_artifact(tmp_path / "metrics.jsonl", "metrics")
        log.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [("mlflow reporting is off for the rest of this run: log failed at step 2 (RuntimeError: "
                        "(sqlite3.OperationalError) database is locked); training goes on; metrics.jsonl, checkpoints "
                        "and the adapter are written as before")]
    assert store.logged == [1] and store.closed == 0 and store.stops == 1  # its run ended once, as failed
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
