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

# Which way is better, for ``mode: auto`` (train.early_stopping, the sweep). A metric is looked up without its
# ``eval_`` / ``target_`` (DANN's target-domain figures) prefix. Lower: losses (any ``*_loss``: ORPO's nll_loss too),
# perplexity and the regression errors.
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae", "rmse")
# Higher: scores of answers and labels; of the preference figures (peftlab.objectives.preference) only those the
# objective itself pushes up on held-out pairs: the reward accuracy and margin (DPO's loss is -log sigmoid(margin)),
# ORPO's log-odds figures (its term is -log sigmoid(log odds)) and the chosen answers' log-likelihood (a held-out
# NLL of the answers to keep, with the sign flipped).
HIGHER_IS_BETTER = ("accuracy", "precision", "recall", "f1_macro", "f1_micro", "exact_match", "token_f1", "r2",
                    "rewards/accuracies", "rewards/margins", "log_odds_ratio", "log_odds_chosen", "logps/chosen")
# Everything else has no direction auto can defend, and auto refuses it (set mode: min or max): rewards/chosen and
# rewards/rejected (DPO often lowers both while the margin grows), logps/rejected (lower means the rejected answers
# lost likelihood, or the model degenerated), kl (KTO: distance from the reference, not quality), domain_accuracy
# (DANN wants it at chance), counts (eval_tokens, eval_samples), the DANN lambda, and any name peftlab does not emit.
ALIASES = {"loss": "eval_loss", "ppl": "perplexity", "f1": "f1_macro"}


def metric_key(name: str) -> str:
    """The key in the eval results that a recipe's metric name means (``loss`` is ``eval_loss``)."""
    return ALIASES.get(name, name)


def auto_mode(name: str) -> str | None:
    """``min`` or ``max``: which way ``mode: auto`` takes the metric ``name``; None when the better direction is not
    known (see HIGHER_IS_BETTER above), so the caller asks for ``mode: min`` or ``mode: max``."""
    key = metric_key(name)
    base = key.removeprefix("eval_").removeprefix("target_")
    if any(key == k or key.endswith("_" + k) or key.startswith(k + "_") for k in LOWER_IS_BETTER):
        return "min"
    return "max" if base in HIGHER_IS_BETTER else None


class MissingMetric(PeftlabError):
    """The metric early stopping watches is not among an eval's results (``known``: the numeric ones that are)."""

    def __init__(self, message: str, *, metric: str, known: list[str]):
        super().__init__(message)
        self.metric, self.known = metric, known


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
            mode = auto_mode(self.metric)
            if mode is None:
                raise PeftlabError(
                    f"train.early_stopping.metric {self.metric!r}: mode auto does not know whether lower or higher "
                    "is better for it; set train.early_stopping.mode: min or train.early_stopping.mode: max")
            self.mode = mode
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
            raise MissingMetric(
                f"train.early_stopping.metric: {self.metric!r} is not among this run's eval metrics "
                f"({', '.join(known) or 'none — is there eval data?'}); pick one of them", metric=self.metric,
                known=known)
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
