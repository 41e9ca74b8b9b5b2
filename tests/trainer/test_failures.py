"""What a run says when the machine fails it: out of memory is recognised (and nothing else is), a refused
write of the run's output stops it with the file, the errno, the fix and the checkpoint to continue from — in
process, and end to end with the real errno of a read-only file (mid-run) and of an unwritable output.dir."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, make_quickstart_data

from peftlab.checkpoint import store as ckpt
from peftlab.errors import PeftlabError
from peftlab.trainer.failures import diagnose, failure_message, out_of_memory_detail, resume_hint

pytestmark = pytest.mark.xdist_group("trainer")

STEPS, SAVE_EVERY = 12, 2


def test_allocation_failures_are_recognised_and_nothing_else():
    assert out_of_memory_detail(MemoryError()) == "MemoryError"
    assert out_of_memory_detail(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")) == (
        "CUDA out of memory. Tried to allocate 2.00 GiB")
    assert out_of_memory_detail(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you "
                                             "tried to allocate 1 bytes")).startswith("[enforce fail]")
    assert out_of_memory_detail(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert out_of_memory_detail(OSError(errno.ENOSPC, "No space left on device")) is None


def test_only_refused_writes_of_the_runs_own_output_are_explained(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    inside = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(out / "metrics.jsonl"))
    failure = diagnose(inside, out)
    assert failure is not None and failure.storage[:2] == (str(out / "metrics.jsonl"), errno.EDQUOT)
    assert diagnose(OSError(errno.EDQUOT, "quota", str(tmp_path / "elsewhere")), out) is None
    assert diagnose(OSError(errno.ECONNRESET, "reset", str(out / "x")), out) is None  # not a storage errno
    assert diagnose(OSError(errno.ENOSPC, "No space left on device"), out) is None  # no file named
    msg = str(failure_message(failure, recipe=None, step=7, last=out / "checkpoints" / "step-0000006"))
    assert msg.startswith(f"training stopped after step 7: could not write {out / 'metrics.jsonl'}: ")
    assert "(errno EDQUOT); free space within your disk quota, or choose an output.dir elsewhere." in msg
    assert msg.endswith(f"The last complete checkpoint {out / 'checkpoints' / 'step-0000006'} (step 6) is intact; "
                        "once that is fixed, continue with: peftlab train RECIPE --set resume=auto")
    assert resume_hint(None).startswith("No checkpoint was written yet (train.save_every sets how often)")


def test_metrics_write_failing_mid_run_stops_with_the_checkpoint_to_resume_from(short_trainer, tmp_path, monkeypatch):
    from peftlab.metrics import runlog as metrics

    out = tmp_path / "o"
    t = short_trainer(out, train={"max_steps": 5})
    real_append = metrics.append_line

    def append(path: Path, line: str) -> None:
        if t.state.step >= 3:  # the filesystem turns read-only during step 3's log line
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_append(path, line)

    monkeypatch.setattr(metrics, "append_line", append)
    with pytest.raises(PeftlabError) as e:
        t.train()
    root = out / "checkpoints"
    msg = str(e.value)
    assert msg.startswith(f"training stopped after step 3: could not write {out / 'metrics.jsonl'}: Read-only file "
                          "system (errno EROFS); the filesystem is mounted read-only")
    assert f"The last complete checkpoint {root / 'step-0000002'} (step 2) is intact" in msg
    assert msg.endswith("continue with: peftlab train RECIPE --set resume=auto")
    assert ckpt.verify(root / "step-0000002") is None and not (out / "adapter").exists()
    monkeypatch.setattr(metrics, "append_line", real_append)
    result = short_trainer(out, train={"max_steps": 5}, resume="auto").train()
    assert result.state.step == 5
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5]


# ---- the real errno of an unwritable output directory, at the start and mid-run ---------------------------------


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


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


@pytest.mark.slow
def test_unwritable_output_dir_stops_with_a_message_at_start_and_mid_run(tmp_path, short_recipe):
    prefix = _obeying_file_permissions()
    data = make_quickstart_data(tmp_path / "data", n_train=40, n_eval=2)
    out = tmp_path / "run"
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(short_recipe(data, out, train={"max_steps": STEPS, "grad_accum": 2,
                                                                        "save_every": SAVE_EVERY})))
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
