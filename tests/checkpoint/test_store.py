"""Checkpoint files and guards, in process: atomic writes and rotation, corrupt checkpoints skipped,
a full disk keeps the previous checkpoint, pickles with code refused, recipe changes refused,
non-finite steps skipped / aborted, loss-spike watchdog. (Kill -9 / SIGTERM runs: test_resume.py.)"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.checkpoint import store as ckpt
from peftlab.errors import PeftlabError
from peftlab.recipe.schema import recipe_from_dict
from peftlab.trainer.loop import Trainer

pytestmark = pytest.mark.xdist_group("trainer")


def _raw(data_dir: Path, out: Path, **sections) -> dict:
    train = {"max_steps": 3, "micro_batch_size": 4, "grad_accum": 1, "save_every": 1, "eval_at_start": False,
             **sections.pop("train", {})}
    resume = sections.pop("resume", None)
    adapter = {"dropout": 0.1, **sections.pop("adapter", {})}
    output = {"report_to": ["jsonl"], "plot": False, **sections.pop("output", {})}
    raw = tiny_recipe_dict(data_dir, out, quantization={"mode": "none"}, adapter=adapter, data={"max_seq_len": 48},
                           train=train, eval={"max_prompts": 1, "max_new_tokens": 2}, output=output, **sections)
    return {**raw, "resume": resume}


def _trainer(data_dir: Path, out: Path, **sections) -> Trainer:
    return Trainer(recipe_from_dict(_raw(data_dir, out, **sections)), quiet=True)



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_quickstart_data(tmp_path_factory.mktemp("ck-data"), n_train=24, n_eval=2)


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """A 3-step run with a checkpoint after steps 1 and 2 (the last step writes the final adapter)."""
    out = tmp_path_factory.mktemp("ck-run")
    _trainer(data_dir, out).train()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ---- files, markers, rotation ------------------------------------------------------------------------


def test_write_is_atomic_rotation_keeps_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        ckpt.write_checkpoint(root, step, {"a.bin": bytes([step]) * 10, "sub/b.json": b"{}"}, keep_last=2)
    assert _steps(root) == ["step-0000004", "step-0000005"]
    marker = json.loads((root / "step-0000005" / ckpt.MARKER).read_text())
    assert marker["step"] == 5 and set(marker["files"]) == {"a.bin", "sub/b.json"}
    # A save killed after its rename (no marker) and a newer bit-rotten one are not checkpoints.
    (root / "step-0000006").mkdir()
    (root / "step-0000006" / "a.bin").write_bytes(b"x")
    shutil.copytree(root / "step-0000005", root / "step-0000007")
    (root / "step-0000007" / "a.bin").write_bytes(bytes([9]) * 10)  # same size, other content
    warnings: list[str] = []
    assert ckpt.find_resume_checkpoint(root, warnings.append) == root / "step-0000005"
    assert len(warnings) == 2
    assert "step-0000006" in warnings[0] and "no COMPLETE marker" in warnings[0]
    assert "step-0000007" in warnings[1] and "a.bin does not match its checksum" in warnings[1]
    # keep_last=1 never removes the newest complete checkpoint, whatever lies around it.
    ckpt.rotate(root, 1)
    assert _steps(root) == ["step-0000005", "step-0000006", "step-0000007"]


def test_checkpoint_file_names_cannot_escape(tmp_path):
    with pytest.raises(PeftlabError, match="points outside"):
        ckpt.write_checkpoint(tmp_path / "c", 1, {"../../evil.txt": b"x"})
    assert not (tmp_path / "evil.txt").exists() and not list((tmp_path / "c").iterdir())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path)
    with pytest.raises(PeftlabError, match="checkpoint.dir='link/x' points outside"):
        ckpt.safe_subpath(tmp_path / "out", "link/x", what="checkpoint.dir")


@pytest.mark.parametrize("bad", ["../elsewhere", "/tmp/abs", "a/../../b"])
def test_recipe_checkpoint_dir_must_stay_inside_output(tmp_path, bad):
    with pytest.raises(PeftlabError, match=r"checkpoint\.dir: .*relative folder inside output\.dir"):
        recipe_from_dict(_raw(tmp_path, tmp_path / "o", checkpoint={"dir": bad}))


def test_security_defaults(tmp_path):
    r = recipe_from_dict(_raw(tmp_path, tmp_path / "o"))
    assert r.model.trust_remote_code is False
    assert r.checkpoint.keep_last == 3 and r.guards.max_consecutive_nonfinite == 5


# ---- resume picks the right checkpoint --------------------------------------------------------------------


def test_checkpoint_contents(finished_run):
    root = finished_run / "checkpoints"
    assert _steps(root) == ["step-0000001", "step-0000002"]
    c = ckpt.load_checkpoint(root / "step-0000002")
    assert c.trainer_state["step"] == 2 and c.trainer_state["micro_index"] == 2
    assert set(c.engine_state) == {"optimizer", "scheduler", "scaler"}
    assert c.engine_state["scheduler"]["last_epoch"] == 2
    assert set(c.rng) == {"python", "numpy", "torch", "cuda"}
    assert c.recipe["train"]["seed"] == 7 and c.recipe["checkpoint"]["keep_last"] == 3
    assert all(k.startswith("base_model.model.") and "lora_" in k for k in c.adapter_weights)
    from peftlab.adapters.peft_format import read_adapter_config

    assert read_adapter_config(root / "step-0000002" / "adapter")["r"] == 8  # a PEFT-format adapter


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-marker"])
def test_corrupt_newest_checkpoint_is_skipped(data_dir, run_copy, capsys, damage):
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
    t = _trainer(data_dir, run_copy, resume="auto")
    assert t.resumed_from == run_copy / "checkpoints" / "step-0000001"
    assert t.state.step == 1 and t.state.micro_index == 1
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in err
    assert {"truncate": "engine.pt is truncated", "flip": "does not match its checksum",
            "no-marker": "no COMPLETE marker"}[damage] in err
    with pytest.raises(PeftlabError, match="is not a usable checkpoint"):
        _trainer(data_dir, run_copy, resume=str(newest))


def test_resume_restores_weights_optimizer_and_position(data_dir, run_copy):
    t = _trainer(data_dir, run_copy, resume=str(run_copy / "checkpoints" / "step-0000002"))
    saved = ckpt.load_checkpoint(run_copy / "checkpoints" / "step-0000002")
    from peftlab.adapters.peft_format import lora_state_dict

    for k, v in lora_state_dict(t.model).items():
        assert torch.equal(v, saved.adapter_weights[k])
    opt = t.engine.optimizer.state_dict()
    for i, s in saved.engine_state["optimizer"]["state"].items():
        assert torch.equal(opt["state"][i]["exp_avg"], s["exp_avg"]) and float(opt["state"][i]["step"]) == 2
    assert t.engine.lr == saved.engine_state["optimizer"]["param_groups"][0]["lr"]


def test_recipe_change_that_breaks_resume_is_refused(data_dir, run_copy, capsys):
    with pytest.raises(PeftlabError) as e:
        _trainer(data_dir, run_copy, resume="auto", adapter={"r": 4},
                 train={"micro_batch_size": 2, "seed": 8})
    msg = str(e.value)
    assert "would make the resumed run wrong" in msg
    for line in ("adapter.r: 8 -> 4", "train.micro_batch_size: 4 -> 2", "train.seed: 7 -> 8"):
        assert line in msg
    # lr / max_steps may change (lowering lr after a spike): named, and applied from the next step on.
    t = _trainer(data_dir, run_copy, resume="auto", train={"lr": 1e-3, "max_steps": 5})
    assert "train.lr: 0.003 -> 0.001" in capsys.readouterr().err
    assert t.engine.optimizer.param_groups[0]["initial_lr"] == 1e-3 and t.total_steps == 5


def test_changed_training_data_is_refused(data_dir, run_copy, tmp_path):
    other = make_quickstart_data(tmp_path / "other", n_train=24, n_eval=2, seed=99)
    raw = _raw(data_dir, run_copy, resume="auto")
    shutil.copy(other / "train.jsonl", tmp_path / "train.jsonl")
    raw["data"]["train"][0]["path"] = str(tmp_path / "train.jsonl")
    with pytest.raises(PeftlabError, match="data.train"):  # the path changed: refused as a recipe key
        Trainer(recipe_from_dict(raw), quiet=True)
    (data_dir / "train.jsonl").rename(data_dir / "train.jsonl.bak")
    try:
        shutil.copy(other / "train.jsonl", data_dir / "train.jsonl")  # same path, other content
        with pytest.raises(PeftlabError, match="tokenized training data differ"):
            _trainer(data_dir, run_copy, resume="auto")
    finally:
        (data_dir / "train.jsonl.bak").replace(data_dir / "train.jsonl")


# ---- a full disk ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_on", ["engine.pt", ".COMPLETE.tmp"])
def test_full_disk_keeps_previous_checkpoint(data_dir, run_copy, monkeypatch, fail_on):
    t = _trainer(data_dir, run_copy, resume="auto")  # at step 2
    t.state.step = 3
    real_write = ckpt._write_bytes

    def write(path: Path, data: bytes) -> None:
        if path.name == fail_on:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", write)
    root = run_copy / "checkpoints"
    with pytest.raises(PeftlabError) as e:
        t.save_checkpoint()
    msg = str(e.value)
    assert f"into {root}: No space left on device" in msg
    assert f"the previous checkpoint {root / 'step-0000002'} is intact" in msg and "free disk space" in msg
    assert _steps(root) == ["step-0000001", "step-0000002"]  # no partial directory left behind
    assert ckpt.verify(root / "step-0000002") is None
    monkeypatch.setattr(ckpt, "_write_bytes", real_write)
    assert _trainer(data_dir, run_copy, resume="auto").resumed_from == root / "step-0000002"


# ---- pickles with code ---------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_pickle_with_code_is_refused(data_dir, run_copy, tmp_path):
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "engine.pt"
    torch.save({"optimizer": _Payload(sentinel)}, evil)
    with pytest.raises(PeftlabError, match=r"refusing to load .*engine\.pt.*never contain code"):
        ckpt.load_torch_file(evil)
    # Planted in a checkpoint whose marker was rewritten to match: resuming refuses it too.
    target = run_copy / "checkpoints" / "step-0000002"
    shutil.copy(evil, target / "engine.pt")
    marker = json.loads((target / ckpt.MARKER).read_text())
    data = evil.read_bytes()
    import hashlib

    marker["files"]["engine.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (target / ckpt.MARKER).write_text(json.dumps(marker))
    with pytest.raises(PeftlabError, match="refusing to load"):
        _trainer(data_dir, run_copy, resume=str(target))
    assert not sentinel.exists()


# ---- guards -------------------------------------------------------------------------------------------------------


def _inf_grad_at(trainer: Trainer, steps) -> None:
    """Make the gradient of one LoRA weight infinite during the given (1-based) optimizer steps."""
    p = next(p for n, p in trainer.model.named_parameters() if p.requires_grad)
    p.register_hook(lambda g: torch.full_like(g, float("inf")) if trainer.state.step + 1 in steps else g)


def test_nonfinite_gradient_and_loss_are_skipped_and_counted(data_dir, tmp_path, capsys):
    t = _trainer(data_dir, tmp_path / "o", train={"max_steps": 4})
    _inf_grad_at(t, {2})
    clean_loss = t.loss_fn

    def nan_loss_at_step_3(model, batch, **kw):
        loss = clean_loss(model, batch, **kw)
        return loss * float("nan") if t.state.step + 1 == 3 else loss

    t.loss_fn = nan_loss_at_step_3
    result = t.train()
    assert result.state.skipped_steps == 2 and result.state.step == 4
    records = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if r["split"] == "train"] == [False, True, True, False]
    # Two updates were applied (AdamW counts its steps per parameter).
    assert all(float(s["step"]) == 2 for s in t.engine.optimizer.state.values())
    assert all(torch.isfinite(p).all() for p in t.model.parameters() if p.requires_grad)
    err = capsys.readouterr().err
    assert "step 2: non-finite gradient norm" in err and "step 3: non-finite loss" in err
    # Saves due inside the streak were deferred to the next clean step.
    # (step 4 is the last: the final adapter, not a checkpoint, is written for it)
    assert _steps(tmp_path / "o" / "checkpoints") == ["step-0000001"]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["skipped_steps"] == 2


def test_repeated_nonfinite_steps_abort_without_saving(data_dir, tmp_path):
    t = _trainer(data_dir, tmp_path / "o", train={"max_steps": 10}, guards={"max_consecutive_nonfinite": 3})
    _inf_grad_at(t, set(range(2, 11)))
    with pytest.raises(PeftlabError) as e:
        t.train()
    root = tmp_path / "o" / "checkpoints"
    assert str(e.value).startswith("training aborted: 3 optimizer steps in a row (steps 2-4) had a non-finite")
    assert f"the last complete checkpoint is {root / 'step-0000001'}" in str(e.value)
    assert _steps(root) == ["step-0000001"]
    assert not (tmp_path / "o" / "adapter").exists()


@pytest.mark.parametrize("action", ["warn", "abort"])
def test_loss_spike_watchdog(data_dir, tmp_path, capsys, action):
    t = _trainer(data_dir, tmp_path / "o", train={"max_steps": 5, "save_every": None},
                 guards={"loss_spike_window": 2, "loss_spike_factor": 2.0, "loss_spike_action": action})
    clean_loss = t.loss_fn
    t.loss_fn = lambda model, batch, **kw: clean_loss(model, batch, **kw) * (10.0 if t.state.step + 1 == 4 else 1.0)
    if action == "warn":
        result = t.train()
        assert result.state.step == 5 and result.state.skipped_steps == 0
        assert "step 4: loss spike:" in capsys.readouterr().err
        return
    weights: dict[str, torch.Tensor] = {}
    t.engine.step = _record_weights_before_step(t, weights)
    with pytest.raises(PeftlabError, match=r"training stopped at step 4: loss spike: .* the update was not applied"):
        t.train()
    assert t.state.step == 3
    for n, p in t.model.named_parameters():  # the spiking step left the weights as they were before it
        if p.requires_grad:
            assert torch.equal(p, weights[n])


def _record_weights_before_step(t: Trainer, weights: dict):
    step = t.engine.step

    def wrapped(**kw):
        weights.update({n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad})
        return step(**kw)

    return wrapped


# ---- every checkpoint damaged; a fresh run into an old run's checkpoints -------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(data_dir, run_copy):
    root = run_copy / "checkpoints"
    _truncate(root / "step-0000001" / "engine.pt")
    f = root / "step-0000002" / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")  # same size, other content
    metrics = (run_copy / "metrics.jsonl").read_bytes()
    with pytest.raises(PeftlabError) as e:
        _trainer(data_dir, run_copy, resume="auto")
    msg = str(e.value)
    assert msg.startswith(f"resume: auto found no usable checkpoint in {root}")
    assert f"{root / 'step-0000001'}: engine.pt is truncated" in msg
    assert f"{root / 'step-0000002'}: adapter/adapter_model.safetensors does not match its checksum" in msg
    assert "Nothing was changed or deleted" in msg and "resume: PATH" in msg
    assert "resume: null and output.overwrite: true" in msg
    # nothing was deleted: the old metrics and both (damaged) checkpoints are as they were
    assert (run_copy / "metrics.jsonl").read_bytes() == metrics
    assert _steps(root) == ["step-0000001", "step-0000002"]
    # starting over as the message says: the damaged checkpoints and the old metrics go
    t = _trainer(data_dir, run_copy, output={"overwrite": True})
    assert t.state.step == 0 and t.resumed_from is None
    assert not (run_copy / "metrics.jsonl").exists() and _steps(root) == []


def test_resume_auto_starts_over_when_only_interrupted_saves_exist(data_dir, run_copy, capsys):
    """A save killed before its COMPLETE marker never was a checkpoint: step 0, with a warning, as before."""
    root = run_copy / "checkpoints"
    for step in ("step-0000001", "step-0000002"):
        (root / step / ckpt.MARKER).unlink()
    t = _trainer(data_dir, run_copy, resume="auto")
    assert t.state.step == 0 and t.resumed_from is None
    assert "no COMPLETE marker" in capsys.readouterr().err


def test_fresh_run_into_an_earlier_runs_checkpoints_is_refused(data_dir, run_copy):
    """Without resume, an earlier run's checkpoints would interleave with the new run's (rotation could keep
    theirs, and a later resume: auto would continue the other run): refused unless output.overwrite."""
    shutil.rmtree(run_copy / "adapter")  # an interrupted run: checkpoints, no final adapter
    root = run_copy / "checkpoints"
    with pytest.raises(PeftlabError, match=r"holds checkpoints of an earlier run \(step-0000001, step-0000002 in "
                                           r".*resume: auto.*output.overwrite: true"):
        _trainer(data_dir, run_copy)
    assert _steps(root) == ["step-0000001", "step-0000002"] and (run_copy / "metrics.jsonl").exists()


# ---- the output directory: a file, not writable, failing mid-run ---------------------------------------------------


def test_output_dir_that_is_a_file_is_refused(data_dir, tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(PeftlabError, match=rf"output.dir {tmp_path / 'out'} is a file, not a directory; set "
                                           r"output.dir to a directory"):
        _trainer(data_dir, tmp_path / "out")
    with pytest.raises(PeftlabError, match=rf"output.dir {tmp_path / 'out' / 'run'} lies under {tmp_path / 'out'}, "
                                           "which is a file"):
        _trainer(data_dir, tmp_path / "out" / "run")
    assert (tmp_path / "out").read_text() == "not a directory"


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "the filesystem is mounted read-only: remount it read-write"),
                                       (errno.EACCES, "this user may not write there: fix its permissions"),
                                       (errno.ENOSPC, "free disk space")])
def test_unwritable_output_dir_is_refused_before_any_work(data_dir, tmp_path, monkeypatch, code, fix):
    """Simulated at the write site (tests run as root, which ignores permissions; the real errno is checked
    end to end in test_resume.py)."""
    def refuse(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(ckpt, "_write_bytes", refuse)
    out = tmp_path / "out"
    with pytest.raises(PeftlabError) as e:
        _trainer(data_dir, out)
    assert str(e.value).startswith(f"output.dir {out} is not writable ({os.strerror(code)}): {fix}")
    assert "nothing was trained" in str(e.value)
    assert list(out.iterdir()) == []  # the probe file is gone too


def test_metrics_write_failing_mid_run_stops_with_the_checkpoint_to_resume_from(data_dir, tmp_path, monkeypatch):
    from peftlab.metrics import runlog as metrics

    out = tmp_path / "o"
    t = _trainer(data_dir, out, train={"max_steps": 5})
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
    result = _trainer(data_dir, out, train={"max_steps": 5}, resume="auto").train()
    assert result.state.step == 5
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5]
