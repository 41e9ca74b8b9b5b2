"""peftlab sweep over a preference (DPO) recipe: it ranks by the held-out reward accuracy unless told otherwise, it
refuses to rank trials that differ in preference.* by a figure whose scale those keys change (eval_loss, the
rewards), a metric the trials do not report is named with the ones they do, and best_recipe.yaml is the winner."""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import yaml
from helpers import tiny_recipe_dict

from peftlab.errors import PeftlabError
from peftlab.metrics.console import setup_logging
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer import sweep
from peftlab.trainer.sweep import SweepSpec, TrialResult, run_sweep

pytestmark = pytest.mark.xdist_group("trainer")


def _pairs(n: int, offset: int, reverse: bool = False) -> list[dict]:
    """``n+1?`` answered with a full stop (chosen) or without (rejected), as recipes/make_preference_data.py;
    ``reverse``: the other way round."""
    def turn(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]
    return [{"prompt": [{"role": "user", "content": f"{a}+1?"}],
             **dict(zip(("rejected", "chosen") if reverse else ("chosen", "rejected"),
                        (turn(f"{a + 1}."), turn(f"{a + 1}"))))}
            for a in ((i + offset) % 9 for i in range(n))]


@pytest.fixture(scope="module")
def dpo_base(tmp_path_factory) -> dict:
    """A DPO recipe of the micro model: 8 training pairs, 4 held out, 2 steps of 4 pairs, no generation."""
    d = tmp_path_factory.mktemp("dpo-data")
    for name, rows in (("train", _pairs(8, 0)), ("eval", _pairs(4, 3)), ("reversed", _pairs(8, 0, reverse=True))):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = tiny_recipe_dict(d, d / "run", quantization={"mode": "none"}, adapter={"dropout": 0.0},
                            data={"train": [{"path": str(d / "train.jsonl")}], "eval": [{"path": str(d / "eval.jsonl")}],
                                  "max_seq_len": 32},
                            train={"max_steps": 2, "micro_batch_size": 4, "grad_accum": 1, "eval_at_start": False},
                            eval={"metric": "loss"}, output={"report_to": ["jsonl"], "plot": False})
    return {**base, "preference": {"method": "dpo", "beta": 0.1}}


def test_a_preference_sweep_ranks_by_reward_accuracy_and_writes_the_winner(dpo_base, tmp_path):
    # trial-000 learns the opposite of the held-out preference, trial-001 learns it
    right = dpo_base["data"]["train"]
    reverse = [{"path": right[0]["path"].replace("train.jsonl", "reversed.jsonl")}]
    spec = SweepSpec(base=dpo_base, parameters={"data.train": [reverse, right]}, output=str(tmp_path / "sweep"))
    result = run_sweep(spec, dpo_base, tmp_path)
    assert spec.metric == "eval_rewards/accuracies"  # the default for a recipe with a preference: section
    scores = {t.name: t.last.metrics["eval_rewards/accuracies"] for t in result.trials}
    assert {t.name: t.last.score for t in result.trials} == scores
    assert scores == {"trial-000": 0.0, "trial-001": 1.0}
    assert [t.name for t in result.ranked] == ["trial-001", "trial-000"]  # higher is better
    with (result.output_dir / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["trial"], float(r["eval_rewards/accuracies"])) for r in rows] == [
        ("trial-001", scores["trial-001"]), ("trial-000", scores["trial-000"])]
    summary = json.loads((result.output_dir / "sweep.json").read_text())
    assert summary["metric"] == "eval_rewards/accuracies" and summary["best"]["trial"] == "trial-001"
    text = (result.output_dir / "best_recipe.yaml").read_text()
    assert text.splitlines()[:2] == [
        "# best of 2 trials by eval_rewards/accuracies: trial-001 data.train=" + json.dumps(right),
        (f"# the base recipe with the winning values; local paths are absolute (resolved from {tmp_path}), so "
         "`peftlab train` runs this file from any folder")]
    best = yaml.safe_load(text)
    recipe = recipe_from_dict(best, base_dir=tmp_path)
    assert recipe.data.train[0].path == right[0]["path"] and recipe.preference.beta == 0.1
    assert recipe.preference.method == "dpo" and recipe.train.max_steps == 2
    assert best["output"]["dir"] == dpo_base["output"]["dir"]


@pytest.mark.parametrize("metric", ["eval_loss", "loss", "eval_rewards/margins", "rewards/chosen"])
@pytest.mark.parametrize("key, values", [("preference.beta", [0.1, 0.5]), ("preference.method", ["dpo", "ipo"])])
def test_ranking_trials_that_differ_in_preference_keys_by_a_scaled_figure_is_refused(dpo_base, tmp_path, metric,
                                                                                     key, values):
    spec = SweepSpec(base=dpo_base, parameters={key: values}, metric=metric, output=str(tmp_path / "sweep"))
    calls = []
    with pytest.raises(PeftlabError) as e:
        run_sweep(spec, dpo_base, tmp_path, runner=lambda *a: calls.append(a))
    assert calls == [] and not (tmp_path / "sweep").exists()
    assert str(e.value).startswith(f"sweep metric {metric!r}: the trials differ in {key}, which ")
    assert str(e.value).endswith("rank them by eval_rewards/accuracies (the default for preference recipes) or "
                                 "eval_logps/chosen, or by a generation metric (eval.metric: exact_match), or keep "
                                 f"{key} fixed and sweep other keys")


def test_other_keys_may_be_ranked_by_eval_loss_and_metrics_take_their_eval_prefix(dpo_base, tmp_path):
    seen = []

    def scripted(raw, base_dir, metric, mode):
        seen.append((metric, mode))
        return TrialResult(score=raw["train"]["lr"], steps=2, output_dir=raw["output"]["dir"])

    spec = SweepSpec(base=dpo_base, parameters={"train.lr": [1e-3, 2e-3]}, metric="loss",
                     output=str(tmp_path / "a"))
    assert run_sweep(spec, dpo_base, tmp_path, runner=scripted).best.params == {"train.lr": 1e-3}
    spec = SweepSpec(base=dpo_base, parameters={"preference.beta": [0.1, 0.5]}, metric="rewards/accuracies",
                     output=str(tmp_path / "b"))
    run_sweep(spec, dpo_base, tmp_path, runner=scripted)
    assert spec.metric == "eval_rewards/accuracies"
    assert seen == [("loss", "min")] * 2 + [("eval_rewards/accuracies", "max")] * 2


def test_a_metric_the_trials_do_not_report_is_named_with_those_they_do(dpo_base, tmp_path):
    spec = SweepSpec(base=dpo_base, parameters={"train.lr": [3e-3, 1e-3]}, metric="exact_match",
                     output=str(tmp_path / "sweep"))
    with pytest.raises(PeftlabError) as e:
        run_sweep(spec, dpo_base, tmp_path)
    assert str(e.value) == (
        "sweep metric 'exact_match' is not among the eval metrics of trial-000 (eval_logps/chosen, eval_logps/rejected, "
        "eval_loss, eval_rewards/accuracies, eval_rewards/chosen, eval_rewards/margins, eval_rewards/rejected); set "
        f"the sweep's metric: to one of them (its results are in {tmp_path / 'sweep' / 'trial-000'})")


def test_a_kto_recipe_without_held_out_pairs_is_told_why_the_default_metric_is_missing(dpo_base, tmp_path,
                                                                                      monkeypatch):
    class Unpaired:  # what a KTO run whose eval rows are single completions reports
        def __init__(self, recipe, quiet):
            self.out = recipe.output_dir

        def train(self):
            return SimpleNamespace(best=None, state=SimpleNamespace(step=2), output_dir=self.out, eval_after={
                "eval_loss": 0.69, "eval_kl": 0.0, "eval_rewards/chosen": 0.01, "samples": []})

    monkeypatch.setattr(sweep, "Trainer", Unpaired)
    kto = {**dpo_base, "preference": {"method": "kto", "beta": 0.1}}
    spec = SweepSpec(base=kto, parameters={"train.lr": [1e-3, 3e-3]}, output=str(tmp_path / "sweep"))
    with pytest.raises(PeftlabError) as e:
        run_sweep(spec, kto, tmp_path)
    assert str(e.value) == (
        "sweep metric 'eval_rewards/accuracies' is not among the eval metrics of trial-000 (eval_kl, eval_loss, "
        "eval_rewards/chosen); eval_rewards/accuracies, the default for preference recipes, needs held-out pairs (a "
        "KTO recipe reports it when data.eval holds {prompt, chosen, rejected} rows); set the sweep's metric: to one "
        f"of them (its results are in {tmp_path / 'sweep' / 'trial-000'})")


def test_a_winner_by_trial_order_alone_is_said_to_be_one(dpo_base, tmp_path, capsys):
    def tie(raw, base_dir, metric, mode):
        return TrialResult(score=1.0 if raw["train"]["lr"] < 3e-3 else 0.5, steps=2, output_dir=raw["output"]["dir"])

    spec = SweepSpec(base=dpo_base, parameters={"train.lr": [3e-3, 1e-3, 2e-3]}, output=str(tmp_path / "sweep"))
    setup_logging("info")
    capsys.readouterr()
    result = run_sweep(spec, dpo_base, tmp_path, runner=tie)
    assert result.best.name == "trial-001"
    assert capsys.readouterr().err.splitlines() == [
        ("peftlab: warning: 2 trials tie on eval_rewards/accuracies at 1.0000 (trial-001, trial-002): trial-001 is "
         "named best only because it ran first; to tell them apart, rank by another metric (the sweep's metric:) or "
         "hold out more eval data")]
