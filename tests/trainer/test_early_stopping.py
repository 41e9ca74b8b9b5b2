"""Early stopping: patience and min-delta on a scripted metric sequence; the best adapter is kept."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.errors import PeftlabError
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.early_stopping import EarlyStopping
from peftlab.trainer.loop import Trainer


def _run(stopper, seq):
    for step, value in enumerate(seq, start=1):
        if stopper.update(step, {"eval_loss": value, "accuracy": value}).stop:
            return step
    return None


def test_patience_and_min_delta_on_a_scripted_sequence():
    # min mode (eval_loss): 3.97 and 3.46 are within min_delta of the best -> not improvements
    es = EarlyStopping(metric="loss", patience=2, min_delta=0.05)
    assert es.mode == "min" and es.metric == "eval_loss"
    assert _run(es, [5.0, 4.0, 3.97, 3.5, 3.6, 3.46, 1.0]) == 6
    assert (es.best, es.best_step, es.stopped_at) == (3.5, 4, 6)
    # max mode (accuracy), patience 3, any increase counts
    es = EarlyStopping(metric="accuracy", patience=3)
    assert es.mode == "max"
    assert _run(es, [0.5, 0.6, 0.6, 0.7, 0.69, 0.7, 0.65, 0.9]) == 7
    assert (es.best, es.best_step) == (0.7, 4)
    # never stops while improving; NaN is never an improvement
    es = EarlyStopping(metric="eval_loss", patience=1)
    assert _run(es, [3.0, 2.0, 1.0]) is None and es.best_step == 3
    assert es.update(4, {"eval_loss": float("nan")}).stop


def test_unknown_metric_and_missing_eval_every_are_user_errors(tmp_path):
    with pytest.raises(PeftlabError, match="'f1_macro' is not among this run's eval metrics.*eval_loss"):
        EarlyStopping(metric="f1").update(1, {"eval_loss": 1.0})
    raw = tiny_recipe_dict(tmp_path, tmp_path / "out", train={"early_stopping": {"metric": "loss"}})
    with pytest.raises(PeftlabError, match="early_stopping needs train.eval_every"):
        recipe_from_dict(raw)


@pytest.mark.slow
def test_trainer_stops_at_the_right_step_and_keeps_the_best_adapter(tmp_path):
    from safetensors.torch import load_file

    from peftlab.adapters.peft_format import lora_state_dict

    data = make_quickstart_data(tmp_path / "data", n_train=32, n_eval=4)
    raw = tiny_recipe_dict(data, tmp_path / "out", quantization={"mode": "none"},
                           train={"max_steps": 20, "eval_every": 1, "eval_at_start": False, "grad_accum": 1,
                                  "early_stopping": {"metric": "loss", "patience": 2, "min_delta": 0.05}})
    raw["output"]["plot"] = False
    trainer = Trainer(recipe_from_dict(raw), quiet=True)
    script = iter([5.0, 4.0, 3.97, 3.5, 3.6, 3.46, 1.0, 1.0])
    snapshots = {}

    def scripted_evaluate():  # the run's weights at every eval, and a scripted metric
        snapshots[trainer.state.step] = {k: v.clone() for k, v in lora_state_dict(trainer.model).items()}
        return {"eval_loss": next(script)}

    trainer.evaluate = scripted_evaluate
    result = trainer.train()
    assert result.state.step == 6 and len(result.losses) == 6
    assert result.best["best_step"] == 4 and result.best["best"] == 3.5 and result.best["stopped_at"] == 6
    best = load_file(str(tmp_path / "out" / "best" / "adapter_model.safetensors"))
    assert best.keys() == snapshots[4].keys()
    assert all(torch.equal(best[k], snapshots[4][k]) for k in best)
    assert any(not torch.equal(best[k], snapshots[6][k]) for k in best)  # the final weights moved on
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["early_stopping"]["best_step"] == 4 and summary["steps"] == 6
    final = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], snapshots[6][k]) for k in final)
