"""A DANN run's target-domain rows are part of what a resume checks: a checkpoint records their content per
``dann.target[i]`` and a resume onto a changed target file is refused with a message naming the key, the file and
the fix; unchanged files resume. (The training rows' own check: :func:`peftlab.checkpoint.resume.resume`.)"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer
from peftlab.trainer.state import check_input_fingerprints

REPO = Path(__file__).resolve().parents[2]


def dann_data(out: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_dann_data", REPO / "recipes" / "make_dann_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen.write_all(out, n_train=12, n_eval=4, seed=5)


def dann_recipe(data: Path, out: Path, resume: str | None = None) -> dict:
    return {"task": "classification", "model": {"name": "builtin:micro-llama"}, "quantization": {"mode": "none"},
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": [{"path": str(data / "source_train.jsonl"), "format": "classification"}],
                     "max_seq_len": 48},
            "dann": {"target": [str(data / "target_train.jsonl")], "head": {"hidden_size": 16}},
            "train": {"max_steps": 2, "micro_batch_size": 6, "grad_accum": 1, "lr": 3e-3, "seed": 7,
                      "warmup_steps": 0, "eval_at_start": False, "save_every": 1},
            "output": {"dir": str(out), "plot": False, "report_to": ["jsonl"], "overwrite": resume is not None},
            "guards": {"loss_spike_action": "off"}, "resume": resume}


def test_a_resume_onto_changed_target_rows_is_refused_and_unchanged_ones_resume(tmp_path):
    data = dann_data(tmp_path / "data")
    Trainer(recipe_from_dict(dann_recipe(data, tmp_path / "run")), quiet=True).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000001"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["input_fingerprints"]
    assert list(saved) == ["dann.target[0]"] and saved["dann.target[0]"]["rows"] > 0

    again = Trainer(recipe_from_dict(dann_recipe(data, tmp_path / "run", resume=str(ckpt))), quiet=True)
    assert again.state.step == 1 and again.train().state.step == 2  # unchanged target rows: resumes

    target = data / "target_train.jsonl"
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    rows[0]["text"] = "a row that was not there when the checkpoint was written"
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PeftlabError) as err:
        Trainer(recipe_from_dict(dann_recipe(data, tmp_path / "run", resume=str(ckpt))), quiet=True)
    msg = str(err.value)
    assert msg.startswith(f"resume: the rows of dann.target[0] ({target}) differ from those the checkpoint {ckpt}")
    assert f"({len(rows)} rows then, {len(rows)} now;" in msg
    assert msg.endswith("Restore that file as it was, or start a fresh run (another output.dir, or no resume key)")


def test_a_checkpoint_without_input_fingerprints_resumes_with_a_warning(tmp_path, caplog):
    now = {"dann.target[0]": {"path": "t.jsonl", "rows": 3, "fingerprint": "abc"}}
    with caplog.at_level(logging.WARNING):
        check_input_fingerprints({"step": 1}, now, tmp_path)  # written before these were kept: cannot check
    assert "does not record the content of dann.target[0]" in caplog.text
    check_input_fingerprints({"input_fingerprints": now}, now, tmp_path)
    with pytest.raises(PeftlabError, match=r"\(no rows then, 3 now"):
        check_input_fingerprints({"input_fingerprints": {}}, now, tmp_path)
