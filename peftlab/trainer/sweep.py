"""``peftlab sweep SWEEP.yaml``: grid or random search over recipe keys, one trial after another.

A sweep file names a base recipe and the keys to vary (any dotted recipe key: ``train.lr``,
``adapter.r``, ``adapter.alpha``, ``adapter.dropout``, ``adapter.target_modules``, ...)::

    recipe: quickstart.yaml            # relative to the sweep file
    method: grid                       # grid | random
    trials: 8                          # random: how many; grid: optional cap
    metric: eval_loss                  # any eval metric (accuracy, f1_macro, exact_match, ...); default below
    mode: auto                         # auto | min | max
    parameters:
      train.lr: [1.0e-4, 3.0e-4, 1.0e-3]
      adapter.r: [8, 16]
      adapter.dropout: {uniform: [0.0, 0.1]}     # random only; also log_uniform, int_uniform
    early_stopping: {patience: 2}      # every trial stops early on `metric` (needs train.eval_every)
    successive_halving: {min_steps: 20, eta: 2}  # optional
    set: ["train.max_steps=100"]       # overrides for every trial
    output: runs/sweep

Every trial's recipe is validated before the first one trains (a typo fails in a second, not after
an hour), and so is the search itself: an empty ``parameters:``, a key with an empty list of values,
and a recipe without eval data (``data.eval`` or ``data.eval_split``: the ranking needs an eval
metric) are refused before anything trains or is written. Each trial trains into
``<output>/trial-NNN/``; its score is the best value of ``metric`` over its evals (with early
stopping) or its final eval. The results are ranked into
``results.csv`` and ``results.md`` and the winner is written as ``best_recipe.yaml`` (the base recipe
plus the winning values, local paths absolute; train it again, or take ``trial-NNN/best`` / ``adapter``).

Successive halving (Jamieson & Talwalkar 2016): every configuration first trains ``min_steps``; the
best 1/eta go on to eta x the steps, and so on up to the base ``train.max_steps``. Survivors are
retrained from scratch at the larger budget (simple and exactly reproducible; no resume between rungs).

The metric defaults to ``eval_loss``, and for a preference recipe (a ``preference:`` section: DPO, IPO, KTO, ...)
to ``eval_rewards/accuracies``, the held-out share of pairs whose chosen answer out-scores the rejected one; a
preference figure may be named without its ``eval_`` prefix (``rewards/accuracies``). Trials that differ in a
``preference.*`` key (beta, method, sft_weight, ...) are not ranked by ``eval_loss`` or the rewards: those keys
change the scale of both (a reward is beta x the log-ratio to the reference), so a larger beta would "win" with
the same model; the sweep refuses that before anything trains. A winner that only ties with others on the metric
(reward accuracies on a few held-out pairs often do, at 1.0) is named best by trial order, and a warning says so.
``best_recipe.yaml`` trains from wherever it lies (``peftlab train <output>/best_recipe.yaml``): the base recipe's
local paths are written absolute, as they resolved from its folder (:func:`best_recipe`), and its ``output.dir`` is
the base recipe's, not a trial's.

``mode: auto`` ranks losses, perplexity and errors lower-is-better and accuracy, F1, exact match, r2, the reward
accuracy and margin and ``eval_logps/chosen`` higher-is-better (:func:`peftlab.trainer.early_stopping.auto_mode`); a
metric with no defensible direction (``eval_rewards/chosen``, ``eval_rewards/rejected``, ``eval_logps/rejected``,
``eval_kl``, ``domain_accuracy``, a name peftlab does not know) is refused before anything trains: set ``mode: min``
or ``mode: max``. When the sweep's ``early_stopping:`` watches a metric a trial does not report, the message names
the sweep's ``metric:`` (the key to change), not the trial recipe's ``train.early_stopping.metric``.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftlab.checkpoint.atomic import atomic_write_text
from peftlab.errors import PeftlabError
from peftlab.recipe.parse import apply_overrides, recipe_from_dict, set_nested
from peftlab.trainer.early_stopping import MissingMetric, auto_mode, metric_key
from peftlab.trainer.loop import Trainer

logger = logging.getLogger(__name__)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HalvingSpec(_Spec):
    min_steps: int = Field(..., gt=0)
    eta: int = Field(2, ge=2)


class EarlyStopSpec(_Spec):
    patience: int = Field(2, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class SweepSpec(_Spec):
    recipe: str | None = None
    """Path of the base recipe (relative to the sweep file)."""
    base: dict[str, Any] | None = None
    """The base recipe inline (instead of ``recipe``)."""
    method: Literal["grid", "random"] = "grid"
    trials: int | None = Field(None, gt=0)
    seed: int = 0
    metric: str | None = None
    """The eval metric that ranks the trials; None: eval_rewards/accuracies for a preference recipe, else eval_loss
    (resolved by :func:`run_sweep`)."""
    mode: Literal["auto", "min", "max"] = "auto"
    parameters: dict[str, Any]
    early_stopping: EarlyStopSpec | None = None
    successive_halving: HalvingSpec | None = None
    set: list[str] = []
    output: str = "runs/sweep"


@dataclass
class TrialResult:
    score: float
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    best_step: int | None = None
    stopped_at: int | None = None
    output_dir: str = ""


@dataclass
class Trial:
    name: str
    params: dict[str, Any]
    raw: dict[str, Any]
    results: list[tuple[int, TrialResult]] = field(default_factory=list)  # (budget steps, result)

    @property
    def last(self) -> TrialResult | None:
        return self.results[-1][1] if self.results else None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, dict[str, Any], Path]:
    """(spec, base recipe mapping, base dir) of a sweep file; errors name the key and the fix."""
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        spec = SweepSpec(**raw)
    except yaml.YAMLError as exc:
        raise PeftlabError(f"sweep {path} is not valid YAML: {exc}") from None
    except (ValidationError, TypeError) as exc:
        raise PeftlabError(f"invalid sweep {path}: {_errors(exc)}") from None
    base_dir = path.resolve().parent
    if (spec.recipe is None) == (spec.base is None):
        raise PeftlabError(f"sweep {path}: give either `recipe: PATH` or an inline `base:` recipe (exactly one)")
    if spec.recipe is not None:
        rp = base_dir / spec.recipe
        if not rp.is_file():
            raise PeftlabError(f"sweep {path}: recipe {spec.recipe} not found (relative to {base_dir})")
        base = yaml.safe_load(rp.read_text()) or {}
        recipe_dir = rp.resolve().parent
    else:
        base, recipe_dir = spec.base, base_dir
    spec.set = [*spec.set, *(overrides or [])]
    if not Path(spec.output).is_absolute():  # the sweep's output is relative to the sweep file
        spec.output = str(base_dir / spec.output)
    return spec, base, recipe_dir


def _errors(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return str(exc)


# ---- the search space --------------------------------------------------------------------------


def _draw(key: str, dist: Any, rng: random.Random) -> Any:
    if isinstance(dist, list):
        if not dist:
            raise PeftlabError(f"sweep parameters.{key}: an empty list of values")
        return rng.choice(dist)
    if isinstance(dist, dict) and len(dist) == 1:
        (kind, bounds), = dist.items()
        if kind in ("uniform", "log_uniform", "int_uniform") and isinstance(bounds, list) and len(bounds) == 2:
            lo, hi = float(bounds[0]), float(bounds[1])
            if kind == "uniform":
                return rng.uniform(lo, hi)
            if kind == "log_uniform":
                if lo <= 0:
                    raise PeftlabError(f"sweep parameters.{key}: log_uniform bounds must be > 0")
                return math.exp(rng.uniform(math.log(lo), math.log(hi)))
            return rng.randint(int(lo), int(hi))
    raise PeftlabError(f"sweep parameters.{key}: expected a list of values or one of "
                       "{uniform: [lo, hi]}, {log_uniform: [lo, hi]}, {int_uniform: [lo, hi]}; got " + repr(dist))


def configurations(spec: SweepSpec) -> list[dict[str, Any]]:
    """The parameter settings of the trials, in run order (deterministic for ``spec.seed``)."""
    keys = list(spec.parameters)
    if not keys:
        raise PeftlabError("sweep parameters: empty; name at least one recipe key and its values to search, e.g. "
                           "parameters: {train.lr: [1.0e-4, 3.0e-4]} (to train one recipe, use peftlab train)")
    empty = [k for k in keys if isinstance(spec.parameters[k], list) and not spec.parameters[k]]
    if empty:
        raise PeftlabError(f"sweep parameters.{empty[0]}: an empty list of values; give at least one value, "
                           "e.g. [1.0e-4, 3.0e-4], or remove the key")
    if spec.method == "grid":
        bad = [k for k in keys if not isinstance(spec.parameters[k], list)]
        if bad:
            raise PeftlabError(f"sweep method grid needs a list of values for {bad}; use method: random for "
                               "distributions")
        combos = [dict(zip(keys, values)) for values in itertools.product(*(spec.parameters[k] for k in keys))]
        return combos[:spec.trials] if spec.trials else combos
    if not spec.trials:
        raise PeftlabError("sweep method random needs `trials: N`")
    rng = random.Random(spec.seed)
    return [{k: _draw(k, spec.parameters[k], rng) for k in keys} for _ in range(spec.trials)]


def _set_key(raw: dict[str, Any], dotted: str, value: Any) -> None:
    set_nested(raw, dotted.split("."), value, where=f"sweep parameters.{dotted}")


def _with_params(spec: SweepSpec, base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    raw = apply_overrides(json.loads(json.dumps(base)), spec.set)
    for k, v in params.items():
        _set_key(raw, k, v)
    return raw


def trial_recipe(spec: SweepSpec, base: dict[str, Any], params: dict[str, Any], out_dir: Path,
                 steps: int | None = None) -> dict[str, Any]:
    raw = _with_params(spec, base, params)
    _set_key(raw, "output.dir", str(out_dir))
    _set_key(raw, "output.overwrite", True)
    if steps is not None:
        _set_key(raw, "train.max_steps", steps)
    if spec.early_stopping is not None:
        es = spec.early_stopping
        _set_key(raw, "train.early_stopping", {"metric": spec.metric or "eval_loss", "patience": es.patience,
                                               "min_delta": es.min_delta, "mode": spec.mode})
    return raw


# ---- the metric ------------------------------------------------------------------------------------

PREFERENCE_METRIC = "eval_rewards/accuracies"
# What the preference.* keys rescale: the loss (beta, the method, sft_weight, the weights...) and the rewards
# (beta x the log-ratio to the reference). The reward accuracy (a sign), the log-probs and generation metrics are not.
_SCALED_BY_PREFERENCE = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins")


def resolve_metric(spec: SweepSpec, configs: list[dict[str, Any]], raws: list[dict[str, Any]]) -> str:
    """The metric that ranks trials of the parameter settings ``configs`` (recipes ``raws``): the default when
    ``spec.metric`` is unset, a preference figure's ``eval_`` prefix added; ranking trials that differ in a
    ``preference.*`` key by a figure those keys rescale is refused (a silently wrong winner)."""
    preference = any(raw.get("preference") is not None for raw in raws)
    given = spec.metric or (PREFERENCE_METRIC if preference else "eval_loss")
    metric = metric_key(given)
    if preference and ("/" in metric or metric == "kl") and not metric.startswith("eval_"):
        metric = "eval_" + metric  # the preference figures are logged as eval_<figure>
    if preference and metric in _SCALED_BY_PREFERENCE:
        varied = [k for k in spec.parameters if (k == "preference" or k.startswith("preference."))
                  and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
        if varied:
            raise PeftlabError(
                f"sweep metric {given!r}: the trials differ in {varied[0]}, which changes the scale of the preference "
                f"loss and of its rewards (a reward is beta x the log-ratio to the reference), so their {metric} "
                "values are not comparable and the largest beta would win with the same model; rank them by "
                f"{PREFERENCE_METRIC} (the default for preference recipes) or eval_logps/chosen, or by a generation "
                f"metric (eval.metric: exact_match), or keep {varied[0]} fixed and sweep other keys")
    return given if metric == metric_key(given) else metric


# ---- running -------------------------------------------------------------------------------------


def train_trial(raw: dict[str, Any], base_dir: Path, metric: str, mode: str) -> TrialResult:
    """Train one trial, quietly (warnings only; the quiet Trainer restores the console's level after); its score
    is the best eval value of ``metric`` (early stopping on it) or the last one."""
    key = metric_key(metric)
    recipe = recipe_from_dict(raw, source="(sweep trial)", base_dir=base_dir)
    trainer = Trainer(recipe, quiet=True)
    try:
        result = trainer.train()
    except MissingMetric as exc:
        if exc.metric != key:  # the base recipe's own train.early_stopping: its message names that key
            raise
        # the sweep set train.early_stopping on its metric: the key to change is the sweep's, not the recipe's
        raise _metric_missing(metric, exc.known, recipe.output_dir,
                              ", which the sweep's early_stopping: watches at every eval") from None
    best = result.best or {}
    if best.get("best") is not None and best.get("metric") == key and best.get("mode") == mode:
        score, best_step = float(best["best"]), best["best_step"]
    else:  # no early stopping, or the base recipe's own on another metric: the last eval ranks the trial
        if key not in result.eval_after:
            known = sorted(k for k, v in result.eval_after.items() if isinstance(v, (int, float))
                           and not isinstance(v, bool))
            raise _metric_missing(metric, known, Path(result.output_dir))
        score, best_step = float(result.eval_after[key]), result.state.step
    metrics = {k: v for k, v in result.eval_after.items() if isinstance(v, (int, float))}
    return TrialResult(score, result.state.step, metrics, best_step,
                       result.best.get("stopped_at") if result.best else None, str(result.output_dir))


def _metric_missing(metric: str, known: list[str], out: Path, watched: str = "") -> PeftlabError:
    """The sweep's metric is not among a trial's eval metrics (``known``); ``out``: the trial's output folder."""
    hint = (f"; {PREFERENCE_METRIC}, the default for preference recipes, needs held-out pairs (a KTO recipe reports "
            "it when data.eval holds {prompt, chosen, rejected} rows)" if metric_key(metric) == PREFERENCE_METRIC else "")
    return PeftlabError(f"sweep metric {metric!r} is not among the eval metrics of {out.name} "
                        f"({', '.join(known) or 'none'}){watched}{hint}; set the sweep's metric: to one of them (its "
                        f"results are in {out})")


Runner = Callable[[dict[str, Any], Path, str, str], TrialResult]


@dataclass
class SweepResult:
    trials: list[Trial]
    ranked: list[Trial]
    best: Trial
    output_dir: Path


def run_sweep(spec: SweepSpec, base: dict[str, Any], base_dir: Path, *, runner: Runner = train_trial) -> SweepResult:
    """Validate every trial's recipe, train the trials (rung by rung under successive halving), rank them and
    write the results; one line per trained trial and per halving is logged."""
    out = (base_dir / spec.output) if not Path(spec.output).is_absolute() else Path(spec.output)
    trials = [Trial(f"trial-{i:03d}", params, {}) for i, params in enumerate(configurations(spec))]
    spec.metric = resolve_metric(spec, [t.params for t in trials], [_with_params(spec, base, t.params) for t in trials])
    mode = spec.mode if spec.mode != "auto" else auto_mode(spec.metric)
    if mode is None:
        raise PeftlabError(
            f"sweep metric {spec.metric!r}: mode auto does not know whether lower or higher is better for it (auto "
            "knows losses, perplexity and errors: lower; accuracy, F1, exact match, r2, the reward accuracy and "
            "margin, eval_logps/chosen: higher); set the sweep's mode: min or mode: max")
    # Validate every trial's recipe first: a typo in a key fails now, with the recipe's own message.
    for t in trials:
        t.raw = trial_recipe(spec, base, t.params, out / t.name)
        recipe = recipe_from_dict(t.raw, source=f"(sweep {t.name}: {t.params})", base_dir=base_dir)
        if spec.early_stopping is not None and recipe.train.eval_every is None:
            raise PeftlabError("sweep early_stopping needs train.eval_every in the base recipe (or in `set:`)")
        if not recipe.data.eval and recipe.data.eval_split <= 0:
            raise PeftlabError(
                f"sweep: the recipe of {t.name} has no eval data, and the sweep ranks trials by the eval metric "
                f"{spec.metric!r}; give the base recipe data.eval (held-out datasets) or data.eval_split (a "
                "fraction of data.train held out, e.g. 0.1), or add it to the sweep's `set:` "
                "(set: [data.eval_split=0.1])")
    out.mkdir(parents=True, exist_ok=True)  # only once every trial's recipe is known to be trainable
    full_steps = recipe_from_dict(trials[0].raw, base_dir=base_dir).train.max_steps
    budgets = _budgets(spec, full_steps)
    alive = list(trials)
    for rung, steps in enumerate(budgets):
        for t in alive:
            raw = trial_recipe(spec, base, t.params, out / t.name, steps=steps if len(budgets) > 1 else None)
            t0 = time.perf_counter()
            res = runner(raw, base_dir, spec.metric, mode)
            res.metrics["time_s"] = time.perf_counter() - t0
            t.results.append((steps or res.steps, res))
            logger.info(f"{t.name} {_fmt_params(t.params)}: {spec.metric}={res.score:.4f} ({res.steps} steps)")
        if rung < len(budgets) - 1:
            keep = max(1, math.ceil(len(alive) / spec.successive_halving.eta))
            alive = _rank(alive, mode)[:keep]
            logger.info(f"successive halving: {keep} of {len(trials)} configurations go on to {budgets[rung + 1]} steps")
    ranked = _rank(trials, mode)
    best = ranked[0]
    _say_ties(ranked, spec.metric)
    _write_results(out, ranked, spec, base, best, base_dir)
    return SweepResult(trials, ranked, best, out)


def _say_ties(ranked: list[Trial], metric: str) -> None:
    """A winner that only won by trial order is said to be one (reward accuracies on a few held-out pairs often
    tie at 1.0)."""
    best = ranked[0]
    tied = [t for t in ranked if len(t.results) == len(best.results) and t.last.score == best.last.score]
    if len(tied) > 1:
        logger.warning(f"{len(tied)} trials tie on {metric} at {best.last.score:.4f} ({', '.join(t.name for t in tied)}): "
                       f"{best.name} is named best only because it ran first; to tell them apart, rank by another metric "
                       "(the sweep's metric:) or hold out more eval data")


def _budgets(spec: SweepSpec, full_steps: int | None) -> list[int | None]:
    if spec.successive_halving is None:
        return [None]
    if full_steps is None:
        raise PeftlabError("sweep successive_halving needs train.max_steps in the base recipe (the last rung)")
    sh = spec.successive_halving
    budgets, steps = [], sh.min_steps
    while steps < full_steps:
        budgets.append(steps)
        steps *= sh.eta
    return [*budgets, full_steps]


def _rank(trials: list[Trial], mode: str) -> list[Trial]:
    """Deepest rung first, then by score (NaN last); ties keep trial order."""
    def key(t: Trial):
        s = t.last.score if t.last else float("nan")
        bad = not math.isfinite(s)
        return (-len(t.results), bad, (s if mode == "min" else -s) if not bad else 0.0)

    return sorted(trials, key=key)


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _write_results(out: Path, ranked: list[Trial], spec: SweepSpec, base: dict[str, Any], best: Trial,
                   recipe_dir: Path) -> None:
    keys = list(spec.parameters)
    header = ["rank", "trial", *keys, spec.metric, "steps", "best_step", "stopped_at", "time_s", "output_dir"]
    rows = []
    for i, t in enumerate(ranked, start=1):
        r = t.last
        rows.append([i, t.name, *(_fmt(t.params[k]) for k in keys), r.score, r.steps, r.best_step,
                     r.stopped_at, round(r.metrics.get("time_s", 0.0), 2), r.output_dir])
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue())
    md = ["| " + " | ".join(header[:-1]) + " |", "|" + "---|" * (len(header) - 1)]
    md += ["| " + " | ".join(_fmt(c) if isinstance(c, float) else str(c) for c in row[:-1]) + " |" for row in rows]
    atomic_write_text(out / "results.md", "\n".join(md) + "\n")
    atomic_write_text(out / "best_recipe.yaml",
                      f"# best of {len(ranked)} trials by {spec.metric}: {best.name} {_fmt_params(best.params)}\n"
                      f"# the base recipe with the winning values; local paths are absolute (resolved from {recipe_dir}), "
                      "so `peftlab train` runs this file from any folder\n"
                      + yaml.safe_dump(best_recipe(spec, base, best.params, recipe_dir), sort_keys=False))
    atomic_write_text(out / "sweep.json", json.dumps(
        {"metric": spec.metric, "best": {"trial": best.name, "params": best.params, "score": best.last.score},
         "trials": [{"trial": t.name, "params": t.params,
                     "rungs": [{"steps": s, "score": r.score, "metrics": r.metrics} for s, r in t.results]}
                    for t in ranked]}, indent=2, default=str))


def best_recipe(spec: SweepSpec, base: dict[str, Any], params: dict[str, Any], recipe_dir: Path) -> dict[str, Any]:
    """The recipe of the winning ``params`` for ``best_recipe.yaml``: the base recipe with the sweep's ``set:``, the
    winning values and its early stopping, training into the base recipe's own ``output.dir`` (with its
    ``output.overwrite``). Written beside the results, not in the base recipe's folder ``recipe_dir``, so its local
    paths are made absolute (:meth:`~peftlab.recipe.schema.Recipe.with_local_paths_absolute`). Only the keys that
    differ from peftlab's defaults are written, and the swept keys always, so it reads as a recipe a person wrote."""
    raw = trial_recipe(spec, base, params, Path(base.get("output", {}).get("dir", "runs/peftlab")))
    raw["output"]["overwrite"] = base.get("output", {}).get("overwrite", False)
    recipe = recipe_from_dict(raw, source="(sweep best recipe)", base_dir=recipe_dir).with_local_paths_absolute()
    written = recipe.model_dump(mode="json", exclude_defaults=True)
    every = recipe.to_dict()
    for dotted in params:  # a winning value equal to the default is still written: it is the answer
        keys = dotted.split(".")
        value = every
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if value is not None:
            set_nested(written, keys, value, where=f"sweep parameters.{dotted}")
    return _in_order(written, every)


def _in_order(d: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """``d`` with its keys (and its sections' keys) in the order of ``like``'s, i.e. the schema's."""
    return {k: _in_order(d[k], like[k]) if isinstance(d[k], dict) and isinstance(like.get(k), dict) else d[k]
            for k in sorted(d, key=lambda k: list(like).index(k) if k in like else len(like))}


def format_table(result: SweepResult) -> str:
    return (result.output_dir / "results.md").read_text()
