"""The sweep's own keys, seen from the trials and from best_recipe.yaml: best_recipe.yaml, read from the sweep's
output folder (from any working directory), opens the base recipe's data files and trains into its output.dir; a
metric the sweep's early stopping cannot find is reported against the sweep's ``metric:`` key; ``mode: auto`` refuses
a metric whose better direction it does not know."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.data.sources import Source
from peftlab.errors import PeftlabError
from peftlab.recipe.parse import load_recipe
from peftlab.trainer import sweep
from peftlab.trainer.early_stopping import EarlyStopping, auto_mode
from peftlab.trainer.sweep import SweepSpec, TrialResult, load_sweep, run_sweep

pytestmark = pytest.mark.xdist_group("trainer")


def _base(root: Path, train: dict | None = None) -> Path:
    """``root/rec/base.yaml``: the micro model on quickstart rows, every local path relative to ``root/rec``."""
    rec = root / "rec"
    make_quickstart_data(rec / "data", n_train=8, n_eval=4)
    raw = tiny_recipe_dict(Path("data"), Path("runs/base"), quantization={"mode": "none"},
                           train={"max_steps": 2, "grad_accum": 1, "eval_at_start": False, **(train or {})},
                           output={"report_to": ["jsonl"], "plot": False})
    (rec / "base.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return rec / "base.yaml"


def _sweep_file(root: Path, **keys) -> Path:
    """``root/sweeps/sweep.yaml`` over ``../rec/base.yaml`` (another folder than the base recipe's), output ``out``."""
    (root / "sweeps").mkdir(exist_ok=True)
    path = root / "sweeps" / "sweep.yaml"
    path.write_text(yaml.safe_dump({"recipe": "../rec/base.yaml", "output": "out", **keys}))
    return path


def _sources(recipe) -> list[Path]:
    return [Source(s, Path(recipe.base_dir)).path.resolve() for s in (*recipe.data.train, *recipe.data.eval)]


def test_best_recipe_opens_the_base_recipes_files_from_the_sweep_folder(tmp_path, monkeypatch):
    base = load_recipe(_base(tmp_path))
    spec, raw, recipe_dir = load_sweep(_sweep_file(tmp_path, parameters={"adapter.r": [8, 16], "train.lr": [1e-3]}))
    assert recipe_dir == tmp_path / "rec"
    ran = []

    def scripted(raw, base_dir, metric, mode):  # r=16 wins
        ran.append(raw["output"]["dir"])
        return TrialResult(score=1.0 / raw["adapter"]["r"], steps=2, output_dir=raw["output"]["dir"])

    result = run_sweep(spec, raw, recipe_dir, runner=scripted)
    out = tmp_path / "sweeps" / "out"
    assert ran == [str(out / "trial-000"), str(out / "trial-001")]  # trials train into the sweep's folder
    assert result.best.params == {"adapter.r": 16, "train.lr": 1e-3}
    monkeypatch.chdir(tmp_path / "sweeps")  # neither the base recipe's folder nor the best recipe's
    best = load_recipe(out / "best_recipe.yaml")
    assert _sources(best) == _sources(base) == [tmp_path / "rec/data/train.jsonl", tmp_path / "rec/data/eval.jsonl"]
    assert best.output_dir == base.output_dir == tmp_path / "rec/runs/base"  # the base recipe's, not a trial's
    assert best.output.overwrite is False and best.adapter.r == 16 and best.train.lr == 1e-3
    text = (out / "best_recipe.yaml").read_text()
    assert text.splitlines()[:2] == [
        '# best of 2 trials by eval_loss: trial-001 adapter.r=16 train.lr=0.001',
        (f"# the base recipe with the winning values; local paths are absolute (resolved from {tmp_path / 'rec'}), "
         "so `peftlab train` runs this file from any folder")]
    written = yaml.safe_load(text)
    # only what differs from peftlab's defaults, and the swept keys (r=16 is the default: still written)
    assert list(written) == ["model", "quantization", "adapter", "data", "train", "eval", "output"]
    assert written["adapter"] == {"r": 16, "alpha": 16.0, "dropout": 0.0}
    assert written["output"] == {"dir": str(tmp_path / "rec/runs/base"), "report_to": ["jsonl"], "plot": False}
    assert written["data"]["train"] == [{"path": str(tmp_path / "rec/data/train.jsonl"), "format": "messages"}]


def test_the_best_recipe_trains_as_the_base_recipe_would(tmp_path, monkeypatch):
    """A real 1-trial sweep, then `peftlab train <sweep out>/best_recipe.yaml` from another working directory."""
    from peftlab.cli.main import main

    _base(tmp_path)
    sweep_file = _sweep_file(tmp_path, parameters={"train.lr": [3e-3]})
    assert main(["sweep", str(sweep_file), "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["train", "sweeps/out/best_recipe.yaml", "--quiet"]) == 0
    summary = json.loads((tmp_path / "rec/runs/base/summary.json").read_text())
    trial = json.loads((tmp_path / "sweeps/out/trial-000/summary.json").read_text())
    assert summary["steps"] == trial["steps"] == 2
    assert summary["eval_after"]["eval_loss"] == pytest.approx(trial["eval_after"]["eval_loss"], rel=1e-5)
    assert (tmp_path / "rec/runs/base/adapter/adapter_model.safetensors").is_file()


def test_a_metric_the_sweeps_early_stopping_cannot_find_names_the_sweeps_metric_key(tmp_path):
    """Real trial: the sweep's early_stopping watches `accuracy`, which a language-model run does not report."""
    _base(tmp_path)
    spec, raw, recipe_dir = load_sweep(_sweep_file(tmp_path, parameters={"train.lr": [3e-3]}, metric="accuracy",
                                                   early_stopping={"patience": 1}, set=["train.eval_every=1"]))
    with pytest.raises(PeftlabError) as e:
        run_sweep(spec, raw, recipe_dir)
    trial = tmp_path / "sweeps" / "out" / "trial-000"
    assert str(e.value) == (
        "sweep metric 'accuracy' is not among the eval metrics of trial-000 (eval_loss, eval_tokens, perplexity), "
        "which the sweep's early_stopping: watches at every eval; set the sweep's metric: to one of them (its results "
        f"are in {trial})")


class _EvalOnce:
    """A trial without a model: the real early stopping of the trial's recipe sees the eval of step 1 of 2."""

    def __init__(self, recipe, quiet):
        self.recipe, self.eval = recipe, {"eval_loss": 2.0, "perplexity": 7.4}

    def train(self):
        es = EarlyStopping.from_recipe(self.recipe)
        if es is not None:
            es.update(1, self.eval)
        return SimpleNamespace(best=es.summary() if es else None, eval_after=self.eval, state=SimpleNamespace(step=2),
                               output_dir=self.recipe.output_dir)


def test_the_base_recipes_own_early_stopping_keeps_its_key_and_never_scores_another_metric(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "Trainer", _EvalOnce)
    es = {"eval_every": 1, "early_stopping": {"metric": "accuracy"}}
    _base(tmp_path, train=es)
    spec, raw, recipe_dir = load_sweep(_sweep_file(tmp_path, parameters={"train.lr": [3e-3]}))
    with pytest.raises(PeftlabError) as e:
        run_sweep(spec, raw, recipe_dir)
    assert str(e.value) == ("train.early_stopping.metric: 'accuracy' is not among this run's eval metrics "
                            "(eval_loss, perplexity); pick one of them")
    # the base recipe stops early on perplexity, the sweep ranks by eval_loss: the score is eval_loss
    _base(tmp_path, train={**es, "early_stopping": {"metric": "ppl"}})
    spec, raw, recipe_dir = load_sweep(_sweep_file(tmp_path, parameters={"train.lr": [3e-3]}))
    assert run_sweep(spec, raw, recipe_dir).best.last.score == 2.0
    assert run_sweep(spec, raw, recipe_dir).best.last.best_step == 2  # the last eval's
    # the sweep's early stopping on its own metric: the best eval of it
    spec.early_stopping = sweep.EarlyStopSpec(patience=1)
    assert run_sweep(spec, raw, recipe_dir).best.last.best_step == 1


@pytest.mark.parametrize("metric, mode", [
    ("eval_loss", "min"), ("loss", "min"), ("perplexity", "min"), ("ppl", "min"), ("mse", "min"), ("target_mae", "min"),
    ("eval_nll_loss", "min"), ("target_loss", "min"),
    ("accuracy", "max"), ("f1", "max"), ("f1_macro", "max"), ("exact_match", "max"), ("token_f1", "max"), ("r2", "max"),
    ("target_accuracy", "max"), ("eval_rewards/accuracies", "max"), ("eval_rewards/margins", "max"),
    ("eval_logps/chosen", "max"), ("eval_log_odds_ratio", "max"), ("eval_log_odds_chosen", "max"),
    ("eval_rewards/chosen", None), ("eval_rewards/rejected", None), ("eval_logps/rejected", None), ("eval_kl", None),
    ("domain_accuracy", None), ("eval_tokens", None), ("eval_samples", None), ("dann_lambda", None),
    ("my_score", None),
])
def test_auto_knows_which_way_is_better_only_where_it_can_say_why(metric, mode):
    assert auto_mode(metric) == mode


@pytest.mark.parametrize("metric", ["eval_logps/rejected", "rewards/rejected", "eval_rewards/chosen", "my_score"])
def test_a_sweep_on_a_metric_without_a_known_direction_needs_mode_min_or_max(tmp_path, metric):
    base = tiny_recipe_dict(tmp_path, tmp_path / "o")
    base["preference"] = {"method": "dpo"}
    spec = SweepSpec(base=base, parameters={"train.lr": [1e-4, 3e-4]}, metric=metric, output=str(tmp_path / "s"))
    calls = []
    with pytest.raises(PeftlabError) as e:
        run_sweep(spec, base, tmp_path, runner=lambda *a: calls.append(a))
    shown = "eval_" + metric.removeprefix("eval_") if "/" in metric else metric
    assert str(e.value) == (
        f"sweep metric {shown!r}: mode auto does not know whether lower or higher is better for it (auto knows losses, "
        "perplexity and errors: lower; accuracy, F1, exact match, r2, the reward accuracy and margin, "
        "eval_logps/chosen: higher); set the sweep's mode: min or mode: max")
    assert calls == [] and not (tmp_path / "s").exists()
    seen = []

    def scripted(raw, base_dir, metric, mode):
        seen.append((metric, mode, raw["train"]["lr"]))
        return TrialResult(score=raw["train"]["lr"], steps=1, output_dir=raw["output"]["dir"])

    spec = SweepSpec(base=base, parameters={"train.lr": [1e-4, 3e-4]}, metric=metric, mode="max",
                     output=str(tmp_path / "s"))
    assert run_sweep(spec, base, tmp_path, runner=scripted).best.params == {"train.lr": 3e-4}
    assert seen == [(shown, "max", 1e-4), (shown, "max", 3e-4)]


def test_a_recipes_early_stopping_on_a_metric_without_a_known_direction_needs_a_mode():
    with pytest.raises(PeftlabError) as e:
        EarlyStopping(metric="eval_logps/rejected")
    assert str(e.value) == ("train.early_stopping.metric 'eval_logps/rejected': mode auto does not know whether lower "
                            "or higher is better for it; set train.early_stopping.mode: min or "
                            "train.early_stopping.mode: max")
    assert EarlyStopping(metric="eval_logps/rejected", mode="min").mode == "min"
