"""Predictions from a saved classification adapter: `peftlab predict` writes the trained model's predictions
(labels, ids, probabilities), `peftlab eval DIR` reproduces the run's final eval, the reloaded model gives the
same logits, and bad input names the file and row."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import REPO

from peftlab.errors import PeftlabError
from peftlab.evaluation.predict import load_classifier, predict_file
from peftlab.objectives.classification import predict_batches
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

pytestmark = pytest.mark.xdist_group("classify")


def _classify_data(tmp: Path, n_train: int = 32, n_eval: int = 12) -> Path:
    spec = importlib.util.spec_from_file_location("make_classify_data", REPO / "recipes" / "make_classify_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    train, held = gen.generate(n_train, n_eval, seed=3)
    gen.write_jsonl(train, tmp / "train.jsonl")
    gen.write_jsonl(held, tmp / "eval.jsonl")
    return tmp


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = _classify_data(tmp_path_factory.mktemp("cls-data"))
    raw = {"task": "classification", "model": {"name": "builtin:micro-llama"}, "quantization": {"mode": "none"},
           "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
           "data": {"train": [{"path": str(data / "train.jsonl"), "format": "classification"}],
                    "eval": [{"path": str(data / "eval.jsonl"), "format": "classification"}], "max_seq_len": 64},
           "train": {"max_steps": 3, "micro_batch_size": 8, "lr": 3e-3, "seed": 7, "eval_at_start": False},
           "eval": {"metric": "accuracy"},
           "output": {"dir": str(tmp_path_factory.mktemp("cls-run")), "plot": False, "report_to": ["jsonl"]}}
    trainer = Trainer(recipe_from_dict(raw), quiet=True)
    return trainer, trainer.train(), data


def test_predict_writes_the_trained_models_predictions(trained, tmp_path, capsys):
    from peftlab.cli.main import main

    trainer, result, data = trained
    logits, _ = predict_batches(trainer.model, trainer.eval_batches())
    out = tmp_path / "preds" / "eval.jsonl"
    assert main(["predict", str(result.adapter_dir), "--input", str(data / "eval.jsonl"), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    inputs = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == len(inputs) and all(r["text"] == i["text"] for r, i in zip(rows, inputs))
    names = ["food", "sport", "weather"]
    assert [r["label"] for r in rows] == [names[k] for k in logits.argmax(-1).tolist()]
    assert [r["label_id"] for r in rows] == logits.argmax(-1).tolist()
    probs = torch.tensor([[r["probs"][n] for n in names] for r in rows])
    torch.testing.assert_close(probs, logits.softmax(-1), rtol=0, atol=1e-5)  # rounded to 6 decimals
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # written atomically
    # the reloaded adapter + head reproduce the trained model
    loaded, recipe = load_classifier(result.adapter_dir)
    again, _ = predict_batches(loaded.model, trainer.eval_batches())
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-5)
    assert recipe.task == "classification" and not loaded.model.training
    # peftlab eval on the adapter dir gives the run's final eval
    capsys.readouterr()
    assert main(["eval", str(result.adapter_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == result.eval_after["accuracy"]
    assert evaluated["confusion_matrix"] == result.eval_after["confusion_matrix"]


def test_bad_input_names_the_file_and_row(trained, tmp_path):
    _, result, _ = trained
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "rain today"}\n\n{"text": 3}\n')
    with pytest.raises(PeftlabError, match=rf"{bad}:3: expected an object with a string field 'text' \(choose "
                                           "another with --text-field\\)"):
        predict_file(result.adapter_dir, bad, tmp_path / "out.jsonl")
    bad.write_text('{"body": "rain"}\nnot json\n')
    with pytest.raises(PeftlabError, match=rf"{bad}:2: not valid JSON"):
        predict_file(result.adapter_dir, bad, tmp_path / "out.jsonl", text_field="body")
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(PeftlabError, match="is not a classification adapter"):
        load_classifier(tmp_path)
