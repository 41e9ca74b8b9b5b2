"""The checkpoint store, in process: atomic writes and rotation, markers and checksums, leftovers of killed
saves, a full disk keeps the previous checkpoint, pickles with code refused. (Resuming: test_resume.py; what a
run's checkpoint holds: test_save.py; kill -9 of real runs: test_resume.py.)"""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from peftlab.checkpoint import store as ckpt
from peftlab.checkpoint.resume import find_resume_checkpoint, load_checkpoint
from peftlab.errors import PeftlabError
from peftlab.metrics.console import setup_logging
from peftlab.recipe.parse import recipe_from_dict

pytestmark = pytest.mark.xdist_group("trainer")


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ---- files, markers, rotation ------------------------------------------------------------------------


def test_write_is_atomic_rotation_keeps_newest_complete(tmp_path, capsys):
    setup_logging("info")
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        ckpt.write_checkpoint(root, step, {"a.bin": bytes([step]) * 10, "sub/b.json": b"{}"}, keep_last=2)
    assert _steps(root) == ["step-0000004", "step-0000005"]
    marker = json.loads((root / "step-0000005" / ckpt.MARKER).read_text())
    assert marker["step"] == 5 and set(marker["files"]) == {"a.bin", "sub/b.json"}
    assert (root / "step-0000005" / "sub" / "b.json").read_bytes() == b"{}"
    # A save killed after its rename (no marker) and a newer bit-rotten one are not checkpoints.
    (root / "step-0000006").mkdir()
    (root / "step-0000006" / "a.bin").write_bytes(b"x")
    shutil.copytree(root / "step-0000005", root / "step-0000007")
    (root / "step-0000007" / "a.bin").write_bytes(bytes([9]) * 10)  # same size, other content
    capsys.readouterr()
    assert find_resume_checkpoint(root) == root / "step-0000005"
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2
    assert "step-0000006" in warnings[0] and "no COMPLETE marker" in warnings[0]
    assert "step-0000007" in warnings[1] and "a.bin does not match its checksum" in warnings[1]
    # keep_last=1 never removes the newest complete checkpoint, whatever lies around it.
    ckpt.rotate(root, 1)
    assert _steps(root) == ["step-0000005", "step-0000006", "step-0000007"]


def test_leftovers_of_killed_saves_are_recognised_and_rotated_away(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.write_checkpoint(root, 1, {"a.bin": b"1"})
    killed = [".step-0000002.tmp-k3j9x1", ".step-0000001.old-4242", ".tmp-step-0000002-77", ".trash-step-0000001-77"]
    for name in killed:
        (root / name).mkdir()
        (root / name / "a.bin").write_bytes(b"partial")
    (root / ".ds-staging-step-0000002").mkdir()  # DeepSpeed's staging: removed by remove_checkpoints only
    assert all(ckpt.is_interrupted_write(root / n) for n in killed)
    assert not ckpt.is_interrupted_write(root / "step-0000001")
    assert not ckpt.is_interrupted_write(root / ".ds-staging-step-0000002")
    ckpt.write_checkpoint(root, 2, {"a.bin": b"2"}, keep_last=3)
    assert _steps(root) == [".ds-staging-step-0000002", "step-0000001", "step-0000002"]
    ckpt.remove_checkpoints(root)
    assert _steps(root) == []


def test_a_stale_directory_of_the_same_step_is_replaced(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-0000003").mkdir(parents=True)
    (root / "step-0000003" / "old.bin").write_bytes(b"from a crashed save")
    path = ckpt.write_checkpoint(root, 3, {"new.bin": b"new"})
    assert sorted(p.name for p in path.iterdir()) == [ckpt.MARKER, "new.bin"] and ckpt.verify(path) is None
    assert _steps(root) == ["step-0000003"]


def test_checkpoint_file_names_cannot_escape(tmp_path):
    with pytest.raises(PeftlabError, match="points outside"):
        ckpt.write_checkpoint(tmp_path / "c", 1, {"../../evil.txt": b"x"})
    assert not (tmp_path / "evil.txt").exists() and not list((tmp_path / "c").iterdir())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(PeftlabError, match="checkpoint.dir='link/x' points outside"):
        ckpt.safe_subpath(tmp_path / "out", "link/x", what="checkpoint.dir")


@pytest.mark.parametrize("bad", ["../elsewhere", "/tmp/abs", "a/../../b"])
def test_recipe_checkpoint_dir_must_stay_inside_output(tmp_path, ck_recipe, bad):
    with pytest.raises(PeftlabError, match=r"checkpoint\.dir: .*relative folder inside output\.dir"):
        recipe_from_dict(ck_recipe(tmp_path, tmp_path / "o", checkpoint={"dir": bad}))


def test_security_defaults(tmp_path, ck_recipe):
    r = recipe_from_dict(ck_recipe(tmp_path, tmp_path / "o"))
    assert r.model.trust_remote_code is False
    assert r.checkpoint.keep_last == 3 and r.guards.max_consecutive_nonfinite == 5


# ---- a full disk ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_on", ["engine.pt", ".COMPLETE.tmp"])
def test_full_disk_keeps_previous_checkpoint(make_trainer, run_copy, monkeypatch, fail_on):
    t = make_trainer(run_copy, resume="auto")  # at step 2
    t.state.step = 3
    real_write = ckpt.write_file

    def write(path: Path, data: bytes) -> None:
        if path.name.startswith(fail_on):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "write_file", write)
    root = run_copy / "checkpoints"
    with pytest.raises(PeftlabError) as e:
        t.save_checkpoint()
    msg = str(e.value)
    assert f"into {root}: No space left on device" in msg
    assert f"the previous checkpoint {root / 'step-0000002'} is intact" in msg and "free disk space" in msg
    assert _steps(root) == ["step-0000001", "step-0000002"]  # no partial directory left behind
    assert ckpt.verify(root / "step-0000002") is None
    monkeypatch.setattr(ckpt, "write_file", real_write)
    assert make_trainer(run_copy, resume="auto").resumed_from == root / "step-0000002"


# ---- pickles with code ---------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_pickle_with_code_is_refused(make_trainer, run_copy, tmp_path):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "engine.pt"
    torch.save({"optimizer": _Payload(sentinel)}, evil)
    with pytest.raises(PeftlabError, match=r"refusing to load .*engine\.pt.*never contain code"):
        ckpt.load_torch_file(evil)
    # Planted in a checkpoint whose marker was rewritten to match: reading it for a resume refuses it too.
    target = run_copy / "checkpoints" / "step-0000002"
    shutil.copy(evil, target / "engine.pt")
    marker = json.loads((target / ckpt.MARKER).read_text())
    data = evil.read_bytes()
    import hashlib

    marker["files"]["engine.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (target / ckpt.MARKER).write_text(json.dumps(marker))
    with pytest.raises(PeftlabError, match="refusing to load"):
        load_checkpoint(target)
    with pytest.raises(PeftlabError, match="refusing to load"):
        make_trainer(run_copy, resume=str(target))
    assert not sentinel.exists()
