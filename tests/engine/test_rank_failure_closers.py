"""A rank the failure watch stops (peftlab/engine/rank_failure.py) leaves through os._exit, which runs no finally
block and no atexit handler: what registered a closer (close_before_stop) is closed first — records a tracker
still buffers reach the disk, the experiment trackers end their runs as failed, TensorBoard's events stay
readable — and a closer that hangs cannot keep the rank alive (CLOSE_WAIT_S, all closers together)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest
from helpers import free_port, subprocess_env

from peftlab.engine.rank_failure import FailureWatch, close_before_stop, run_closers


@pytest.fixture(autouse=True)
def no_closers_left():
    """The closers are process-wide: none registered by a test outlives it."""
    yield
    run_closers(0.1)


def test_the_watch_closes_what_registered_before_it_exits_and_does_not_wait_for_a_hung_closer(store_pair, caplog):
    events: list[str] = []
    exited = threading.Event()
    hang = threading.Event()
    close_before_stop(lambda: events.append("closed"))
    close_before_stop(hang.wait)  # a tracker server that never answers
    close_before_stop(lambda: 1 / 0)  # a closer that fails is logged; the others still run
    unregister = close_before_stop(lambda: events.append("closed normally before"))
    unregister()  # closed the normal way: not run again

    def exit_process(code: int) -> None:
        events.append(f"exit {code}")
        exited.set()

    watcher = FailureWatch(store_pair[0], 0, 2, poll_s=0.05, ack_wait_s=3, close_wait_s=0.5,
                           exit_process=exit_process).start()
    failing = FailureWatch(store_pair[1], 1, 2, poll_s=0.05, ack_wait_s=3)
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        assert failing.announce("rank 1: boom", 3) is None  # returns once rank 0 has acknowledged
        failing.left()
        # the process ended while the hung closer still waits (released only below): it was not waited for
        assert exited.wait(10)
    hang.set()
    watcher.stop()
    assert events == ["closed", "exit 3"]
    assert "stopping without waiting longer than 0.5 s for: Event" in caplog.text
    assert run_closers(0.1) == []  # the watch ran them all (the unregistered one not at all)


def test_trackers_register_a_failed_end_and_unregister_when_closed(monkeypatch):
    """MLflow driven through a stand-in client (the real store costs seconds to create): a stopped rank ends the
    run FAILED; a run closed normally ends FINISHED and is not touched again by a later stop."""
    calls: list[tuple] = []

    class Client:
        def __init__(self, tracking_uri):
            pass

        def get_experiment_by_name(self, name):
            return types.SimpleNamespace(experiment_id="1")

        def create_run(self, exp_id, run_name):
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_name))

        def log_batch(self, run_id, params=(), metrics=()):
            pass

        def set_terminated(self, run_id, status="FINISHED"):
            calls.append((run_id, status))

    fake = types.ModuleType("mlflow")
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", types.SimpleNamespace(MlflowClient=Client))
    monkeypatch.setitem(sys.modules, "mlflow.entities", types.SimpleNamespace(Param=lambda k, v: (k, v)))
    from peftlab.metrics.trackers import MLflowTracker

    stopped = MLflowTracker(Path("."), {"a": 1}, "stopped")
    closed = MLflowTracker(Path("."), {"a": 1}, "closed")
    closed.close()
    assert run_closers(1.0) == []  # what the watch runs before os._exit
    assert stopped.run_id == "stopped" and calls == [("closed", "FINISHED"), ("stopped", "FAILED")]


STOPPED_RANK = """
import json, threading, time, sys
from datetime import timedelta
from pathlib import Path
import torch
from peftlab.engine.rank_failure import FailureWatch, close_before_stop
from peftlab.metrics import trackers
from peftlab.metrics.runlog import RunLog

port, out = int(sys.argv[1]), Path(sys.argv[2])
server = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=10),
                                    wait_for_workers=False)
stores = [torch.distributed.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10),
                                     wait_for_workers=False) for _ in range(2)]


class BufferedTracker:
    # an experiment tracker that sends its records only when its run ends (as a real client batches them); it
    # registers a closer the way MLflowTracker and WandbTracker do
    def __init__(self, out_dir, params, run_name):
        self.path, self.records = Path(out_dir) / "tracker.jsonl", []
        self._unregister = close_before_stop(self.stopped)

    def log(self, step, split, figures):
        self.records.append({"step": step, **figures})

    def close(self):
        self._unregister()
        self.end("FINISHED")

    def stopped(self):
        self.end("FAILED")

    def end(self, status):
        self.path.write_text("".join(json.dumps(r) + "\\n" for r in self.records) + status + "\\n")


# RunLog builds the trackers of report_to from trackers.TRACKERS; the stand-in takes mlflow's place
trackers.TRACKERS["mlflow"], trackers.PACKAGES["mlflow"] = BufferedTracker, "json"
run_log = RunLog(out, ["jsonl", "tensorboard", "mlflow"], params={}, run_name="stopped")
close_before_stop(threading.Event().wait)  # hangs forever
for step in (1, 2, 3):
    run_log.log(step, "train", {"loss": 1.0 / step})
FailureWatch(stores[0], 0, 2, poll_s=0.05, ack_wait_s=5, close_wait_s=0.5).start()
failing = FailureWatch(stores[1], 1, 2, poll_s=0.05, ack_wait_s=5)

def fail():
    failing.announce("rank 1: out of memory at step 4", 3)
    failing.left()

threading.Thread(target=fail, daemon=True).start()
time.sleep(60)  # blocked as if inside a collective the failed rank never joins
print("not stopped")
"""


def test_a_stopped_process_leaves_what_it_logged_before_the_stop_on_disk(tmp_path):
    """A real os._exit through peftlab's RunLog: metrics.jsonl and TensorBoard's events hold every step, the
    records an experiment tracker still held in its buffer are written by its closer and its run ends FAILED
    (without the closer they are lost: the file is never written), the hung closer is abandoned."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    proc = subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(STOPPED_RANK), str(free_port()),
                           str(tmp_path)], env=subprocess_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]  # the failing rank's status, through os._exit
    assert "not stopped" not in proc.stdout and "stopped because rank 1 failed: out of memory" in proc.stderr
    assert "stopping without waiting longer than 0.5 s for: Event" in proc.stderr
    steps = [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert steps == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert (tmp_path / "tracker.jsonl").read_text().splitlines() == [
        '{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 0.5}', '{"step": 3, "loss": 0.3333333333333333}', "FAILED"]
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = [(e.step, v.tag) for e in EventFileLoader(str(files[0])).Load() for v in e.summary.value]
    assert scalars == [(1, "train/loss"), (2, "train/loss"), (3, "train/loss")]
