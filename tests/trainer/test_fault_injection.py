"""The fault-injection hooks: a listed point SIGKILLs the process (no other point does), the trace appends one
fsynced JSON line per call, and nothing happens without the environment variables."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

from helpers import REPO

from peftlab.trainer import fault_injection

SCRIPT = """
import sys
from peftlab.trainer.fault_injection import kill_point
for point in sys.argv[1:]:
    kill_point(point)
    print("passed", point, flush=True)
"""


def _run(env: dict[str, str], *points: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-c", SCRIPT, *points], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_kill_point_sigkills_at_a_listed_point_only(monkeypatch):
    env = {k: v for k, v in __import__("os").environ.items() if k != fault_injection.KILL_AT_ENV}
    p = _run({**env, fault_injection.KILL_AT_ENV: "save-4-file-2,step-9"}, "step-3", "save-4-file-1", "save-4-file-2",
             "step-5")
    assert p.returncode == -signal.SIGKILL
    assert p.stdout.splitlines() == ["passed step-3", "passed save-4-file-1"]
    p = _run(env, "step-3", "save-4-file-2")  # without the variable every point passes
    assert p.returncode == 0 and p.stdout.splitlines() == ["passed step-3", "passed save-4-file-2"]


def test_trace_step_appends_json_lines(tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    fault_injection.trace_step({"step": 1})  # no variable: nothing is written anywhere
    monkeypatch.setenv(fault_injection.TRACE_ENV, str(trace))
    monkeypatch.setenv(fault_injection.STEP_DELAY_ENV, "0")
    fault_injection.trace_step({"step": 1, "loss": (2.5).hex()})
    fault_injection.trace_step({"step": 2, "sample_ids": [[3, 1]]})
    assert [json.loads(x) for x in trace.read_text().splitlines()] == [
        {"step": 1, "loss": "0x1.4000000000000p+1"}, {"step": 2, "sample_ids": [[3, 1]]}]
