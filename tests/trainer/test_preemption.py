"""Preemption: SIGTERM in the middle of a run writes a checkpoint at the next step boundary and returns a
preempted result that names it (the run resumes there); a second signal exits at once with 128 + signum; the
previous handlers come back after the loop. (End to end, with a real process: tests/checkpoint/test_resume.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers import REPO

from peftlab.checkpoint import store as ckpt
from peftlab.metrics.console import setup_logging
from peftlab.trainer.preemption import Preemption


def test_sigterm_mid_run_checkpoints_at_the_step_boundary_and_stops(short_trainer, tmp_path, capsys):
    setup_logging("info")
    out = tmp_path / "o"
    t = short_trainer(out, quiet=False, train={"max_steps": 6, "save_every": None})
    clean_loss = t.objective.loss

    def signalled_in_step_3(model, batch, **kw):  # as a scheduler would, while step 3 computes
        if t.state.step + 1 == 3 and not t.preemption.requested:
            os.kill(os.getpid(), signal.SIGTERM)
        return clean_loss(model, batch, **kw)

    t.objective.loss = signalled_in_step_3
    before = signal.getsignal(signal.SIGTERM)
    result = t.train()
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers of the loop are gone with it
    root = out / "checkpoints"
    assert result.preempted and result.state.step == 3 and result.checkpoint == root / "step-0000003"
    assert ckpt.verify(result.checkpoint) is None and not (out / "adapter").exists()
    said = capsys.readouterr()
    assert "SIGTERM received: saving a checkpoint at the end of this step, then exiting" in said.err
    assert (f"stopped by SIGTERM at step 3; checkpoint {root / 'step-0000003'}. Continue with: peftlab train "
            "RECIPE --set resume=auto") in said.out
    resumed = short_trainer(out, train={"max_steps": 6, "save_every": None}, resume="auto")
    assert resumed.state.step == 3 and resumed.train().state.step == 6


def test_a_second_signal_exits_at_once():
    script = """
import os, signal, time
from peftlab.metrics.console import setup_logging
from peftlab.trainer.preemption import Preemption
setup_logging("info")
with Preemption().handled() as p:
    os.kill(os.getpid(), signal.SIGINT)
    print("asked:", p.name, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not reached", flush=True)
"""
    p = subprocess.run([sys.executable, "-P", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode == 128 + signal.SIGINT, p.stderr
    assert p.stdout.splitlines() == ["asked: SIGINT"]
    assert "second SIGINT: exiting now, without a new checkpoint" in p.stderr


def test_nothing_is_requested_without_a_signal():
    p = Preemption()
    with p.handled():
        assert not p.requested and p.name == ""
