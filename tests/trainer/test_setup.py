"""Building a run from its recipe: an output.dir the run cannot use is refused before any work (a file, not
writable, an earlier run's checkpoints), the number of steps per epoch and rank, metrics.jsonl continued on
resume, and the resolved recipe saved beside the adapter."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peftlab.checkpoint import store as ckpt
from peftlab.data.pipeline import build_data
from peftlab.errors import PeftlabError
from peftlab.model.builtin import build_tokenizer
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer import setup
from peftlab.trainer.state import EpochSampler, EpochSlice

pytestmark = pytest.mark.xdist_group("trainer")


def test_output_dir_that_is_a_file_is_refused(short_trainer, tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(PeftlabError, match=rf"output.dir {tmp_path / 'out'} is a file, not a directory; set "
                                           r"output.dir to a directory"):
        short_trainer(tmp_path / "out")
    with pytest.raises(PeftlabError, match=rf"output.dir {tmp_path / 'out' / 'run'} lies under {tmp_path / 'out'}, "
                                           "which is a file"):
        short_trainer(tmp_path / "out" / "run")
    assert (tmp_path / "out").read_text() == "not a directory"


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "the filesystem is mounted read-only: remount it read-write"),
                                       (errno.EACCES, "this user may not write there: fix its permissions"),
                                       (errno.ENOSPC, "free disk space")])
def test_unwritable_output_dir_is_refused_before_any_work(short_trainer, tmp_path, monkeypatch, code, fix):
    """Simulated at the write site (tests run as root, which ignores permissions; the real errno is checked
    end to end in test_failures.py)."""
    def refuse(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(ckpt, "write_file", refuse)
    out = tmp_path / "out"
    with pytest.raises(PeftlabError) as e:
        short_trainer(out)
    assert str(e.value).startswith(f"output.dir {out} is not writable ({os.strerror(code)}): {fix}")
    assert "nothing was trained" in str(e.value)
    assert list(out.iterdir()) == []  # the probe file is gone too


def test_fresh_run_into_an_earlier_runs_checkpoints_is_refused(short_data, short_recipe, tmp_path):
    """Without resume, an earlier run's checkpoints would interleave with the new run's (rotation could keep
    theirs, and a later resume: auto would continue the other run): refused unless output.overwrite."""
    out = tmp_path / "run"
    recipe = recipe_from_dict(short_recipe(short_data, out))
    root = out / "checkpoints"
    for step in (1, 2):
        ckpt.write_checkpoint(root, step, {"a.bin": b"x"})
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(PeftlabError, match=r"holds checkpoints of an earlier run \(step-0000001, step-0000002 in "
                                           r".*resume: auto.*output.overwrite: true"):
        setup.prepare_output_dir(recipe, is_main=True)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000001", "step-0000002"]
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(PeftlabError, match="already holds a finished run"):
        setup.prepare_output_dir(recipe, is_main=True)
    # output.overwrite: what the fresh run replaces goes (on the main rank; the others only check)
    recipe.output.overwrite = True
    assert setup.prepare_output_dir(recipe, is_main=False) == root and (out / "metrics.jsonl").exists()
    assert setup.prepare_output_dir(recipe, is_main=True) == root
    assert list(root.iterdir()) == [] and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("rows, mbs, accum, world, epochs, want", [
    (24, 4, 1, 1, 1.0, 6), (25, 4, 1, 1, 1.0, 7), (24, 4, 2, 1, 1.0, 3), (24, 4, 2, 2, 1.0, 2),
    (24, 4, 1, 1, 0.5, 3), (3, 4, 8, 1, 1.0, 1)])
def test_total_steps_of_epochs_per_rank(rows, mbs, accum, world, epochs, want):
    recipe = SimpleNamespace(train=SimpleNamespace(grad_accum=accum, max_steps=None, epochs=epochs))
    assert setup.total_steps(recipe, EpochSampler(rows, mbs, seed=0), world) == want
    recipe.train.max_steps = 11
    assert setup.total_steps(recipe, EpochSampler(rows, mbs, seed=0), world) == 11


def test_continue_metrics_keeps_the_records_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "spl'  # the last line cut by a crash
    path.write_text(text)
    setup.continue_metrics(path, 3, is_main=False)  # only rank 0 touches it
    assert path.read_text() == text
    setup.continue_metrics(path, 3, is_main=True)
    assert [json.loads(x) for x in path.read_text().splitlines()] == records[:3]
    assert not list(tmp_path.glob(".*"))  # written through a temporary file that is gone
    setup.continue_metrics(path, None, is_main=True)  # a fresh run starts a new file
    assert not path.exists()


def test_resolved_recipe_names_the_dtype_and_absolute_paths(short_data, short_recipe, tmp_path):
    """The adapter's peftlab_recipe.yaml is read elsewhere: the compute dtype ``auto`` chose and absolute paths."""
    raw = short_recipe(short_data, tmp_path / "o")
    for spec in (*raw["data"]["train"], *raw["data"]["eval"]):
        spec["path"] = os.path.relpath(spec["path"], tmp_path)
    recipe = recipe_from_dict(raw, base_dir=tmp_path)
    resolved = setup.resolved_recipe(recipe, SimpleNamespace(dtype=torch.bfloat16))
    assert resolved.model.dtype == "bfloat16" and recipe.model.dtype == "auto"
    assert [s.path for s in resolved.data.train] == [str((short_data / "train.jsonl").resolve())]
    assert [s.path for s in resolved.data.eval] == [str((short_data / "eval.jsonl").resolve())]
    assert not Path(recipe.data.train[0].path).is_absolute()  # the run's own recipe is left as written
    assert resolved.output.dir == str((tmp_path / "o").resolve())


def test_seed_everything_makes_every_generator_repeat():
    import random

    import numpy as np

    draws = []
    for _ in range(2):
        setup.seed_everything(5)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1]


def test_several_processes_without_deepspeed_are_refused(short_data, short_recipe, tmp_path, monkeypatch):
    """The local engine never averages gradients across processes: a torchrun launch without a DeepSpeed config
    would train diverging copies of the adapter. Refused before joining (nothing waits for the other ranks)."""
    from peftlab.trainer import setup

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(PeftlabError, match=r"2 processes .*Add deepspeed: zero1 \(or zero2 / zero3: the shipped configs"):
        setup.join(recipe_from_dict(short_recipe(short_data, tmp_path / "out")))


def test_the_batch_builder_augments_train_rows_only_when_the_recipe_asks(tmp_path):
    rows = [{"text": f"we saw a very big storm over the old town number {k}", "label": "ab"[k % 2]} for k in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"task": "classification", "data": {"train": [{"path": "t.jsonl", "format": "classification"}]},
           "augment": {"word_swap": 0.5}}
    tok = build_tokenizer()
    built = {}
    for name, section in (("augmented", raw), ("plain", {k: v for k, v in raw.items() if k != "augment"})):
        recipe = recipe_from_dict(section, base_dir=tmp_path)
        data = build_data(recipe.data, tok, seed=recipe.train.seed, base_dir=tmp_path)
        built[name] = setup.batch_builder(recipe, data, tok, torch.device("cpu"))
    assert built["plain"].augmenter is None and built["augmented"].augmenter is not None
    train = EpochSlice([0, 1, 2], epoch=0)
    a, p = built["augmented"](train), built["plain"](train)
    assert not torch.equal(a["input_ids"], p["input_ids"]) and torch.equal(a["labels"], p["labels"])
    assert torch.equal(built["augmented"]([0, 1, 2])["input_ids"], p["input_ids"])  # no epoch: the cached rows
