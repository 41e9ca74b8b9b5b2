"""One rank failing stops every rank (peftlab/engine/rank_failure.py): a rank blocked as if inside a collective
stops with the failing rank's message and exit status once that rank has said why (over a real TCPStore); the
first failure recorded wins; keys do not leak across torchrun restarts; the PEFTLAB_TEST_OOM_AT hook. The slow
test runs 2 DeepSpeed ranks under torchrun where rank 1 runs out of memory at step 2: the job ends quickly,
non-zero, rank 1 naming itself and rank 0 repeating rank 1's message instead of a gloo traceback."""
from __future__ import annotations

import logging
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ds_config, make_quickstart_data, tiny_recipe_dict, torchrun_train

from peftlab.engine import process_group as pg
from peftlab.engine.rank_failure import FailureWatch, RankFailure, exception_failure
from peftlab.errors import PeftlabError
from peftlab.trainer.fault_injection import kill_point

OOM = ("rank 1: out of memory after 1 completed steps (CUDA out of memory. Tried to allocate 2.00 GiB). "
       "Recipe keys that lower memory: train.micro_batch_size")


class Exits:
    """Stands in for os._exit: records the status and when it came."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.at: float | None = None
        self.done = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.at = time.monotonic()
        self.done.set()


def test_a_blocked_rank_stops_with_the_failing_ranks_message_after_that_rank_has_left(store_pair, caplog):
    exits = Exits()
    watcher = FailureWatch(store_pair[0], 0, 2, poll_s=0.05, ack_wait_s=5, exit_process=exits).start()
    failing = FailureWatch(store_pair[1], 1, 2, poll_s=0.05, ack_wait_s=5, exit_process=Exits())
    caplog.set_level(logging.ERROR, logger="peftlab")
    t0 = time.monotonic()
    assert failing.announce(OOM, 2) is None  # returns once rank 0 has seen it (not after ack_wait_s)
    assert time.monotonic() - t0 < 3
    assert not exits.done.wait(0.3)  # rank 0 waits until rank 1 has left, so rank 1 gets to say why first
    left = time.monotonic()
    failing.left()
    assert exits.done.wait(3) and exits.codes == [2] and exits.at >= left
    assert [r.getMessage() for r in caplog.records] == [
        "rank 0: stopped because rank 1 failed: " + OOM.removeprefix("rank 1: ")]
    watcher.stop()


def test_the_first_failure_wins_and_a_later_one_learns_of_it(store_pair):
    first = FailureWatch(store_pair[1], 1, 2, poll_s=0.05, ack_wait_s=0.5)
    second = FailureWatch(store_pair[0], 0, 2, poll_s=0.05, ack_wait_s=0.5)
    assert first.announce(OOM, 2) is None  # nobody acknowledges: it waits ack_wait_s, then leaves anyway
    assert second.announce("RuntimeError: Connection closed by peer", 1) == RankFailure(1, 2, OOM)
    assert second.announce("again", 1) is None  # once per rank


def test_a_run_that_ends_normally_stops_its_watch_without_exiting(store_pair):
    exits = Exits()
    watch = FailureWatch(store_pair[0], 0, 2, poll_s=0.02, exit_process=exits).start()
    time.sleep(0.1)
    watch.stop()
    assert not watch._thread.is_alive() and exits.codes == []


def test_a_restarted_attempt_does_not_read_the_last_attempts_failure(store_pair, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    FailureWatch(store_pair[1], 1, 2, ack_wait_s=0.1).announce(OOM, 2)
    assert FailureWatch(store_pair[0], 0, 2).peer_failure() == RankFailure(1, 2, OOM)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert FailureWatch(store_pair[0], 0, 2).peer_failure() is None


def test_what_a_failed_rank_reports():
    assert exception_failure(PeftlabError("rank 1: out of memory")) == ("rank 1: out of memory", 2)
    why = "RuntimeError: boom (its traceback is in that rank's log)"
    assert exception_failure(RuntimeError("boom\nmore")) == (why, 1)
    assert RankFailure.decode(RankFailure(3, 2, "a\nb").encode()) == RankFailure(3, 2, "a\nb")


def test_leaving_after_another_ranks_failure_reports_that_failure(store_pair, monkeypatch):
    """gloo's "connection closed by peer" on the surviving rank gives way to the failing rank's message."""
    FailureWatch(store_pair[1], 1, 2, ack_wait_s=0.1).announce(OOM, 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(pg, "_watch", FailureWatch(store_pair[0], 0, 2, ack_wait_s=0.1))
    with pytest.raises(PeftlabError) as err:
        try:
            raise RuntimeError("Connection closed by peer [127.0.0.1]:48771")
        except RuntimeError:
            pg.shutdown_distributed(synchronize=False)
    assert str(err.value).startswith("rank 0: stopped because rank 1 failed: out of memory after 1 completed steps")
    assert err.value.exit_code == 2 and pg._watch is None


def test_the_oom_hook_fires_on_its_rank_and_step_only(monkeypatch):
    monkeypatch.setenv("PEFTLAB_TEST_OOM_AT", "1:2")
    monkeypatch.setenv("RANK", "0")
    kill_point("step-2-backward")
    monkeypatch.setenv("RANK", "1")
    kill_point("step-1-backward")
    kill_point("step-2")
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory.*PEFTLAB_TEST_OOM_AT=1:2"):
        kill_point("step-2-backward")


@pytest.mark.slow
@pytest.mark.xdist_group("deepspeed")
def test_an_oom_on_one_deepspeed_rank_ends_every_rank_with_its_message(tmp_path: Path):
    data = make_quickstart_data(tmp_path / "data", n_train=24, n_eval=4)
    raw = tiny_recipe_dict(data, tmp_path / "out", quantization={"mode": "none"},
                           train={"max_steps": 4, "grad_accum": 1, "micro_batch_size": 2, "eval_at_start": False},
                           output={"report_to": ["jsonl"], "plot": False}, eval={"metric": "loss"})
    raw["deepspeed"] = ds_config("zero2")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    t0 = time.monotonic()
    proc: subprocess.CompletedProcess = torchrun_train(tmp_path, recipe, PEFTLAB_TEST_OOM_AT="1:2")
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert elapsed < 90, f"{elapsed:.0f}s"
    assert "rank 1: out of memory after 1 completed steps (CUDA out of memory." in out, out[-3000:]
    assert "rank 0: stopped because rank 1 failed: out of memory after 1 completed steps" in out, out[-3000:]
    assert "Connection closed by peer" not in out  # rank 0 did not end in gloo's traceback
