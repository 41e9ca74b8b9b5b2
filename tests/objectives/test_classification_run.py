"""A tiny classification run end to end: ``tokens_seen`` counts the input tokens it trained on (not rows, not
padding), and an adapter directory that lost its head file is refused with one message naming the file, the
directory and the fix — from the library (``load_classifier``) and from ``peftlab predict`` (exit 2, no
traceback)."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from helpers import REPO

from peftlab.errors import PeftlabError
from peftlab.evaluation.predict import load_classifier
from peftlab.model.classifier import CONFIG_FILE, HEAD_FILE
from peftlab.objectives.classification import ClassificationObjective
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

pytestmark = pytest.mark.xdist_group("classify")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 steps x 3 rows over a training set of 6 rows: one epoch, every row trained exactly once."""
    spec = importlib.util.spec_from_file_location("make_classify_data", REPO / "recipes" / "make_classify_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    data = tmp_path_factory.mktemp("cls-tokens-data")
    train, held = gen.generate(6, 2, seed=3)
    gen.write_jsonl(train, data / "train.jsonl")
    gen.write_jsonl(held, data / "eval.jsonl")
    raw = {"task": "classification", "model": {"name": "builtin:micro-llama"}, "quantization": {"mode": "none"},
           "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
           "data": {"train": [{"path": str(data / "train.jsonl"), "format": "classification"}], "max_seq_len": 64},
           "train": {"max_steps": 2, "micro_batch_size": 3, "grad_accum": 1, "seed": 7, "eval_at_start": False},
           "output": {"dir": str(tmp_path_factory.mktemp("cls-tokens-run") / "out"), "plot": False,
                      "report_to": ["jsonl"]}}
    trainer = Trainer(recipe_from_dict(raw), quiet=True)
    return trainer, trainer.train(), data


def test_tokens_seen_counts_the_trained_rows_input_tokens(run):
    trainer, result, _ = run
    rows = trainer.data.train
    lengths = [len(e["input_ids"]) for e in rows]
    assert len(rows) == 6 and len(set(lengths)) > 1  # rows of different lengths: padding exists
    assert result.state.step == 2 and result.state.epoch == 0  # the whole set, once
    assert result.state.tokens_seen == sum(lengths)  # not 6 (rows), not the padded batch size
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["tokens_seen"] == sum(lengths)
    # the loss is still the mean over rows: the normaliser of a micro-batch is its row count
    batch = trainer.batch(list(range(3)))
    objective = ClassificationObjective(task="classification")
    assert objective.normalizer(batch) == 3.0
    assert objective.trained_tokens(batch) == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()


@pytest.mark.parametrize("missing", [HEAD_FILE, CONFIG_FILE])
def test_an_adapter_dir_without_its_head_file_is_refused_with_the_fix(run, tmp_path, missing, capsys):
    from peftlab.cli.main import main

    _, result, data = run
    broken = tmp_path / "adapter"
    shutil.copytree(result.adapter_dir, broken)
    (broken / missing).unlink()
    if missing == HEAD_FILE:  # the weights gone, the config left: what a partial copy leaves
        with pytest.raises(PeftlabError) as err:
            load_classifier(broken, device="cpu")
        message = str(err.value)
        assert message.startswith(f"{broken / HEAD_FILE}: no such file; the adapter directory {broken} is incomplete")
        assert "classification head" in message and "re-save the adapter" in message
    capsys.readouterr()
    code = main(["predict", str(broken), "--input", str(data / "eval.jsonl"), "--output", str(tmp_path / "p.jsonl")])
    err_text = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err_text and not (tmp_path / "p.jsonl").exists()
    assert f"peftlab: error: {broken}" in err_text and missing in err_text
