"""peftlab sweep: the search space (grid, seeded random), successive halving on a scripted runner, and a
real 4-trial grid sweep on the micro model that ranks the trials and picks the best by the metric."""
from __future__ import annotations

import csv
import json
import logging
from types import SimpleNamespace

import pytest
import yaml
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.errors import PeftlabError
from peftlab.metrics.console import setup_logging
from peftlab.trainer import sweep
from peftlab.trainer.loop import Trainer
from peftlab.trainer.sweep import SweepSpec, TrialResult, configurations, load_sweep, run_sweep


def test_grid_and_seeded_random_configurations():
    grid = SweepSpec(base={}, parameters={"train.lr": [1e-4, 1e-3], "adapter.r": [4, 8, 16]})
    combos = configurations(grid)
    assert len(combos) == 6 and combos[0] == {"train.lr": 1e-4, "adapter.r": 4}
    assert len({json.dumps(c, sort_keys=True) for c in combos}) == 6
    rnd = SweepSpec(base={}, method="random", trials=5, seed=3,
                    parameters={"train.lr": {"log_uniform": [1e-5, 1e-2]}, "adapter.r": [4, 8],
                                "adapter.dropout": {"uniform": [0.0, 0.2]}})
    a, b = configurations(rnd), configurations(rnd)
    assert a == b and len(a) == 5
    assert all(1e-5 <= c["train.lr"] <= 1e-2 and 0 <= c["adapter.dropout"] <= 0.2 for c in a)
    with pytest.raises(PeftlabError, match="grid needs a list of values"):
        configurations(SweepSpec(base={}, parameters={"train.lr": {"uniform": [0, 1]}}))
    with pytest.raises(PeftlabError, match="log_uniform"):
        configurations(SweepSpec(base={}, method="random", trials=1, parameters={"x.y": {"normal": [0, 1]}}))


def test_unknown_recipe_key_fails_before_any_training(tmp_path):
    spec = SweepSpec(base=tiny_recipe_dict(tmp_path, tmp_path / "o"), parameters={"adapter.rank": [4, 8]},
                     output=str(tmp_path / "sweep"))
    calls = []
    with pytest.raises(PeftlabError, match="did you mean 'adapter.r'"):
        run_sweep(spec, spec.base, tmp_path, runner=lambda *a: calls.append(a))
    assert calls == []


def test_successive_halving_keeps_the_best_half_per_rung(tmp_path, capsys):
    base = tiny_recipe_dict(tmp_path, tmp_path / "o", train={"max_steps": 8})
    spec = SweepSpec(base=base, parameters={"train.lr": [1e-4, 2e-4, 3e-4, 4e-4]}, metric="eval_loss",
                     successive_halving={"min_steps": 2, "eta": 2}, output=str(tmp_path / "sweep"))
    runs = []

    def scripted(raw, base_dir, metric, mode):  # loss falls with lr and with steps
        steps, lr = raw["train"]["max_steps"], raw["train"]["lr"]
        runs.append((steps, lr))
        return TrialResult(score=1.0 / (lr * 1e4) + 1.0 / steps, steps=steps, output_dir=raw["output"]["dir"])

    setup_logging("info")
    capsys.readouterr()
    result = run_sweep(spec, base, tmp_path, runner=scripted)
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("trial-000 train.lr=0.0001: eval_loss=") and said[0].endswith("(2 steps)")
    assert "successive halving: 2 of 4 configurations go on to 4 steps" in said
    assert [s for s, _ in runs] == [2, 2, 2, 2, 4, 4, 8]
    assert {lr for s, lr in runs if s == 4} == {3e-4, 4e-4} and [lr for s, lr in runs if s == 8] == [4e-4]
    assert result.best.params == {"train.lr": 4e-4} and result.ranked[1].params == {"train.lr": 3e-4}


def test_trials_are_quiet_and_the_sweep_speaks_between_and_after_them(tmp_path, monkeypatch, capsys):
    """Each trial builds and trains quietly (its INFO dropped, its warnings kept) through the real Trainer's quiet
    path and train_trial; the sweep's own line after each trial, and the console after the sweep, are heard."""
    said = logging.getLogger("peftlab.trainer.loop")  # what the Trainer's own messages go through

    class ScriptedTrainer(Trainer):  # the real Trainer.__init__ / train (quiet per call), no model
        def _build(self, recipe, quiet):
            self.quiet, self.out_dir, self.lr = quiet, recipe.output_dir, recipe.train.lr
            self.engine = SimpleNamespace(close=lambda: None)  # train() closes its engine
            said.info("building (not heard)")

        def _train(self):
            said.info("training (not heard)")
            said.warning(f"lr {self.lr}: a warning is heard")
            return SimpleNamespace(best=None, eval_after={"eval_loss": self.lr * 1e3}, state=SimpleNamespace(step=2),
                                   output_dir=self.out_dir)

    monkeypatch.setattr(sweep, "Trainer", ScriptedTrainer)
    base = tiny_recipe_dict(tmp_path, tmp_path / "o")
    spec = SweepSpec(base=base, parameters={"train.lr": [2e-3, 1e-3]}, output=str(tmp_path / "sweep"))
    setup_logging("info")
    capsys.readouterr()
    result = run_sweep(spec, base, tmp_path)
    sweep.logger.info("after the sweep")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["trial-000 train.lr=0.002: eval_loss=2.0000 (2 steps)",
                                "trial-001 train.lr=0.001: eval_loss=1.0000 (2 steps)", "after the sweep"]
    assert err.splitlines() == ["peftlab: warning: lr 0.002: a warning is heard",
                                "peftlab: warning: lr 0.001: a warning is heard"]
    assert result.best.params == {"train.lr": 1e-3}


@pytest.mark.slow
def test_four_trial_sweep_on_the_micro_model_picks_the_best(tmp_path):
    from peftlab.cli.main import main

    data = make_quickstart_data(tmp_path / "data", n_train=24, n_eval=4)
    base = tiny_recipe_dict(data, tmp_path / "unused", quantization={"mode": "none"},
                            train={"max_steps": 4, "eval_every": 2, "grad_accum": 1, "eval_at_start": False},
                            output={"report_to": ["jsonl"], "plot": False})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "recipe": "base.yaml", "method": "grid", "metric": "eval_loss", "output": "sweep",
        "parameters": {"train.lr": [1.0e-5, 5.0e-3], "adapter.r": [2, 8]},
        "early_stopping": {"patience": 1}}))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--quiet"]) == 0
    out = tmp_path / "sweep"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and {r["trial"] for r in rows} == {f"trial-{i:03d}" for i in range(4)}
    scores = [float(r["eval_loss"]) for r in rows]
    assert scores == sorted(scores) and len(set(scores)) == 4
    best = rows[0]
    assert float(best["train.lr"]) == 5e-3  # 1e-5 barely moves the adapters in 4 steps
    for r in rows:  # every trial trained, evaluated every 2 steps, and kept its best adapter
        assert (tmp_path / "sweep" / r["trial"] / "best" / "adapter_model.safetensors").is_file()
        summary = json.loads((out / r["trial"] / "summary.json").read_text())
        assert summary["early_stopping"]["best"] == pytest.approx(float(r["eval_loss"]))
    winner = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert winner["train"]["lr"] == 5e-3 and winner["adapter"]["r"] == int(best["adapter.r"])
    spec, _, _ = load_sweep(tmp_path / "sweep.yaml")
    assert spec.output == str(out)


def _cli_sweep(tmp_path, capsys, sweep: dict, base: dict) -> str:
    """Run `peftlab sweep` on files in tmp_path; expect the refusal (status 2), before any trial trained."""
    from peftlab.cli.main import main

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"recipe": "base.yaml", "output": "sweep", **sweep}))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--quiet"]) == 2
    assert not (tmp_path / "sweep").exists()  # refused up front: no trial directory, no results
    err = capsys.readouterr().err
    assert err.startswith("peftlab: error: sweep")
    return err


@pytest.mark.parametrize("method", ["grid", "random"])
def test_empty_value_list_is_refused_before_training(tmp_path, capsys, method):
    base = tiny_recipe_dict(tmp_path, tmp_path / "o")
    sweep = {"method": method, "trials": 2, "parameters": {"adapter.r": [4, 8], "train.lr": []}}
    err = _cli_sweep(tmp_path, capsys, sweep, base)
    assert "sweep parameters.train.lr: an empty list of values; give at least one value" in err
    calls = []
    with pytest.raises(PeftlabError, match="parameters.train.lr: an empty list"):
        run_sweep(SweepSpec(base=base, output=str(tmp_path / "s2"), **sweep), base, tmp_path,
                  runner=lambda *a: calls.append(a))
    assert calls == []


@pytest.mark.parametrize("method", ["grid", "random"])
def test_empty_grid_is_refused(tmp_path, capsys, method):
    base = tiny_recipe_dict(tmp_path, tmp_path / "o")
    err = _cli_sweep(tmp_path, capsys, {"method": method, "trials": 2, "parameters": {}}, base)
    assert "sweep parameters: empty; name at least one recipe key and its values to search" in err


def test_base_recipe_without_eval_data_is_refused_before_any_trial(tmp_path, capsys):
    base = tiny_recipe_dict(tmp_path, tmp_path / "o")
    del base["data"]["eval"]
    err = _cli_sweep(tmp_path, capsys, {"parameters": {"train.lr": [1e-4, 3e-4]}}, base)
    assert ("sweep: the recipe of trial-000 has no eval data, and the sweep ranks trials by the eval metric "
            "'eval_loss'; give the base recipe data.eval (held-out datasets) or data.eval_split") in err
    # the fix it names: an eval split set for every trial
    spec = SweepSpec(base=base, parameters={"train.lr": [1e-4, 3e-4]}, set=["data.eval_split=0.1"],
                     output=str(tmp_path / "s2"))
    seen = []

    def scripted(raw, base_dir, metric, mode):
        seen.append(raw["data"]["eval_split"])
        return TrialResult(score=raw["train"]["lr"], steps=1, output_dir=raw["output"]["dir"])

    assert run_sweep(spec, base, tmp_path, runner=scripted).best.params == {"train.lr": 1e-4}
    assert seen == [0.1, 0.1]
