"""Early stopping on any eval metric: patience, min-delta, and the best checkpoint kept.

The trainer evaluates every ``train.eval_every`` steps and hands each result to
:meth:`EarlyStopping.update`. An evaluation *improves* when it beats the best so far by more than
``min_delta`` (lower for losses, higher for scores); after ``patience`` evaluations in a row without
an improvement training stops. The trainer writes the adapter of every new best to
``<output.dir>/best/`` (overwriting the previous best), so a run that overfits or is stopped keeps
the weights a practitioner would ship; ``summary.json`` names the best step and value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peftlab.errors import PeftlabError

# Metrics where lower is better (mode: auto); every other metric (accuracy, f1, exact_match, ...) is
# higher-is-better.
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae", "rmse")
ALIASES = {"loss": "eval_loss", "ppl": "perplexity", "f1": "f1_macro"}


def metric_key(name: str) -> str:
    """The key in the eval results that a recipe's metric name means (``loss`` is ``eval_loss``)."""
    return ALIASES.get(name, name)


def lower_is_better(name: str) -> bool:
    key = metric_key(name)
    return any(key == k or key.endswith("_" + k) or key.startswith(k + "_") for k in LOWER_IS_BETTER)


@dataclass
class Decision:
    improved: bool
    stop: bool
    value: float


@dataclass
class EarlyStopping:
    """Tracks the best value of one eval metric; ``update`` says whether it improved and whether to stop."""

    metric: str = "eval_loss"
    patience: int = 3
    min_delta: float = 0.0
    mode: str = "auto"  # auto | min | max
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_at: int | None = None
    history: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metric = metric_key(self.metric)
        if self.mode == "auto":
            self.mode = "min" if lower_is_better(self.metric) else "max"
        if self.mode not in ("min", "max"):
            raise PeftlabError(f"early stopping mode {self.mode!r}: expected auto, min or max")

    @classmethod
    def from_recipe(cls, recipe: Any) -> EarlyStopping | None:
        cfg = getattr(recipe.train, "early_stopping", None)
        if cfg is None:
            return None
        return cls(metric=cfg.metric, patience=cfg.patience, min_delta=cfg.min_delta, mode=cfg.mode)

    def value_of(self, metrics: dict[str, Any]) -> float:
        if self.metric not in metrics:
            known = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            raise PeftlabError(
                f"train.early_stopping.metric: {self.metric!r} is not among this run's eval metrics "
                f"({', '.join(known) or 'none — is there eval data?'}); pick one of them"
            )
        return float(metrics[self.metric])

    def is_better(self, value: float, than: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if than is None:
            return True
        return value < than - self.min_delta if self.mode == "min" else value > than + self.min_delta

    def update(self, step: int, metrics: dict[str, Any]) -> Decision:
        """Record the eval at ``step``; ``stop`` once ``patience`` evals in a row did not improve."""
        value = self.value_of(metrics)
        self.history.append((step, value))
        improved = self.is_better(value, self.best)
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        stop = self.bad_evals >= self.patience
        if stop and self.stopped_at is None:
            self.stopped_at = step
        return Decision(improved, stop, value)

    def summary(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step,
                "stopped_at": self.stopped_at, "patience": self.patience, "min_delta": self.min_delta}
