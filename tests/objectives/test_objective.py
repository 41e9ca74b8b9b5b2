"""The objective seam: build_objective picks one object per kind of run (causal LM, distillation,
classification — attaching the head for the data's labels), each satisfies the Objective interface the loop
uses, and the causal-LM objective's loss, counts and evaluation are exactly the functions it stands for."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.evaluation.evaluate import evaluate
from peftlab.model.classifier import HEAD_ATTR
from peftlab.model.load import build_model
from peftlab.objectives.causal_lm import LossSettings, causal_lm_loss, count_targets, loss_normalizer
from peftlab.objectives.classification import ClassificationObjective
from peftlab.objectives.distillation import DistillationObjective
from peftlab.objectives.objective import CausalLMObjective, Objective, build_objective
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer


def test_build_objective_picks_one_object_per_kind_of_run(kd_trainer, tmp_path):
    data = make_quickstart_data(tmp_path, n_train=8, n_eval=4)
    recipe = recipe_from_dict(tiny_recipe_dict(data, tmp_path / "o", quantization={"mode": "none"}))
    loaded = build_model(recipe)
    bundle = SimpleNamespace(eval_prompts=[{"prompt_ids": [1, 2], "reference": "x"}])
    lm = build_objective(recipe, loaded, bundle)
    assert type(lm) is CausalLMObjective and isinstance(lm, Objective)
    assert lm.settings == LossSettings.from_recipe(recipe, loaded.model) and lm.tokenizer is loaded.tokenizer
    assert lm.eval_prompts is bundle.eval_prompts and lm.recipe is recipe
    assert isinstance(kd_trainer.objective, DistillationObjective) and isinstance(kd_trainer.objective, Objective)
    labels = SimpleNamespace(task="classification", label_map={"a": 0, "b": 1}, eval_prompts=[])
    cls_recipe = recipe.model_copy(update={"task": "classification"})
    cls = build_objective(cls_recipe, loaded, labels)
    assert isinstance(cls, ClassificationObjective) and isinstance(cls, Objective)
    assert (cls.task, cls.label_map) == ("classification", {"a": 0, "b": 1})
    assert getattr(loaded.model, HEAD_ATTR).labels == ["a", "b"]  # the head for the data's label space


def test_the_causal_lm_objective_is_the_functions_it_stands_for(tmp_path):
    data = make_quickstart_data(tmp_path, n_train=16, n_eval=4)
    raw = tiny_recipe_dict(data, tmp_path / "o", quantization={"mode": "none"}, eval={"metric": "exact_match"})
    trainer = Trainer(recipe_from_dict(raw), quiet=True)
    objective = trainer.objective
    batch = trainer.batch([0, 1, 2])
    assert objective.targets(batch) == count_targets(batch) and objective.normalizer(batch) == loss_normalizer(batch)
    with torch.no_grad():
        torch.testing.assert_close(objective.loss(trainer.model, batch, normalizer=7.0),
                                   causal_lm_loss(trainer.model, batch, normalizer=7.0, settings=objective.settings),
                                   rtol=0, atol=0)
    got = objective.evaluate(trainer.model, trainer.eval_batches())
    want = evaluate(trainer.model, trainer.tokenizer, trainer.eval_batches(), trainer.data.eval_prompts,
                    recipe=trainer.recipe, settings=objective.settings)
    assert got == want and {"eval_loss", "exact_match", "token_f1"} <= set(got)
    objective.save(trainer.model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()  # nothing of its own beside the adapter
