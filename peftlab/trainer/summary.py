"""The end of a run, and its figures on the console: ``summary.json``, the loss curve, the closing lines.

``summary.json`` (rank 0) holds the steps, trained tokens, skipped steps, training time, the evals before and
after training (without generated samples) and the adapter's path (with early stopping: the best metric, its
step and ``best/``). The closing lines name only the files the run wrote.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from peftlab.checkpoint.atomic import atomic_write_text
from peftlab.metrics.runlog import plot_loss_curve
from peftlab.trainer.early_stopping import EarlyStopping
from peftlab.trainer.state import TrainState

logger = logging.getLogger(__name__)

HEADLINE_METRICS = ("exact_match", "token_f1", "accuracy", "f1_macro", "mse", "eval_loss", "perplexity")


def format_metrics(m: dict[str, Any]) -> str:
    """The headline eval metrics of any objective, as one line."""
    return ", ".join(f"{k}={m[k]:.4f}" for k in HEADLINE_METRICS if k in m) or "(no eval data)"


def say_beside(bar: Any, message: str) -> None:
    """A message between progress-bar updates (the bar is cleared while it is written, then redrawn)."""
    with bar.external_write_mode():
        logger.info(message)


def log_samples(metrics: dict[str, Any]) -> None:
    """The generated answers an eval kept (``eval.show_samples``), beside their references."""
    for s in metrics.get("samples", []):
        logger.info(f"sample: {s['prompt'].strip()!r}\n  reference:  {s['reference']!r}\n  "
                    f"generation: {s['prediction']!r}")


def finish(recipe: Any, state: TrainState, *, before: dict[str, Any], after: dict[str, Any], adapter_dir: Path,
           train_time_s: float, early_stopping: EarlyStopping | None, is_main: bool) -> dict[str, Any] | None:
    """Draw the loss curve, write ``summary.json`` and say where the results are; returns the early-stopping
    summary (None without early stopping)."""
    out = recipe.output_dir
    curve = None
    if recipe.output.plot and is_main:  # drawn from metrics.jsonl: None without jsonl records
        curve = plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
    summary = {"steps": state.step, "tokens_seen": state.tokens_seen, "skipped_steps": state.skipped_steps,
               "train_time_s": train_time_s, "eval_before": _strip_samples(before),
               "eval_after": _strip_samples(after), "adapter": str(adapter_dir)}
    best = None
    if early_stopping is not None:
        best = {**early_stopping.summary(), "adapter": str(out / "best")}
        summary["early_stopping"] = best
        logger.info(f"best {best['metric']}={best['best']} at step {best['best_step']}: {best['adapter']}")
    if is_main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    # Name only the files this run wrote (output.plot: false draws no curve; no jsonl, no metrics file).
    written = [f"metrics: {out / 'metrics.jsonl'}"] if "jsonl" in recipe.output.report_to else []
    if curve is not None:
        written.append(f"loss curve: {curve}")
    elif recipe.output.plot and "jsonl" not in recipe.output.report_to:
        written.append("loss curve: not drawn (it is drawn from metrics.jsonl: add jsonl to output.report_to)")
    logger.info(f"adapter (PEFT format): {adapter_dir}" + ("\n" + "  ".join(written) if written else ""))
    return best


def _strip_samples(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "samples"}
