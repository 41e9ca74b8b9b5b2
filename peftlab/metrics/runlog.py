"""Run metrics: a JSONL log, TensorBoard event files, and a loss-curve PNG at the end.

Every record is one JSON object per line in ``metrics.jsonl`` ({"step", "split", ...figures});
TensorBoard gets the scalar figures under ``<split>/<name>``. The PNG is drawn from the JSONL, so it
can be regenerated after the fact (``plot_loss_curve``); it replaces an earlier one atomically
(:mod:`peftlab.checkpoint.atomic`). metrics.jsonl is only ever appended to.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from peftlab.checkpoint.atomic import atomic_write


class RunLog:
    """Where a run's figures go: metrics.jsonl, TensorBoard and the experiment trackers of ``report_to``;
    ``enabled=False`` (ranks other than 0) writes nothing."""

    def __init__(self, out_dir: Path, report_to: list[str], *, enabled: bool = True,
                 params: dict[str, Any] | None = None, run_name: str | None = None):
        """``params`` (the recipe) and ``run_name`` go to the experiment trackers (mlflow, wandb) of
        ``report_to``; see :mod:`peftlab.metrics.trackers`."""
        self.out_dir = out_dir
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        if enabled and "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self._jsonl = enabled and "jsonl" in report_to
        self._trackers: list[Any] = []
        if enabled and any(name in report_to for name in ("mlflow", "wandb")):
            from peftlab.metrics.trackers import build_trackers

            self._trackers = build_trackers(out_dir, report_to, params=params, run_name=run_name)

    def log(self, step: int, split: str, figures: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: v for k, v in figures.items() if _jsonable(v)}}
        if self._jsonl:
            append_line(self.path, json.dumps(record))
        if self._tb is not None:
            for k, v in figures.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)
            self._tb.flush()
        for tracker in self._trackers:
            tracker.log(step, split, figures)

    def log_artifact(self, path: Path, name: str) -> None:
        """Hand a file or directory (the adapter, metrics.jsonl) to the experiment trackers."""
        for tracker in self._trackers:
            tracker.log_artifact(path, name)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def append_line(path: Path, line: str) -> None:
    """Append one line to ``path``. A refused write (read-only or full disk, permissions) raises its
    OSError with ``filename`` set — a failed ``write`` has none of its own — so the trainer can name the file."""
    try:
        with path.open("a") as f:
            f.write(line + "\n")
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_png: Path) -> Path | None:
    """Train loss (and eval loss / exact match / a preference run's eval reward accuracy when present) against
    optimizer step."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
    ev = [(r["step"], r["eval_loss"]) for r in records if r.get("split") == "eval" and "eval_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    em = [(r["step"], r["exact_match"]) for r in records if r.get("split") == "eval" and "exact_match" in r]
    # preference runs: how often the chosen answer out-scores the rejected one on held-out pairs
    acc = [(r["step"], r["eval_rewards/accuracies"]) for r in records
           if r.get("split") == "eval" and "eval_rewards/accuracies" in r]
    if em or acc:
        ax2 = ax.twinx()
        if em:
            ax2.plot(*zip(*em), "s--", color="tab:green", label="exact match")
        if acc:
            ax2.plot(*zip(*acc), "^:", color="tab:red", label="eval rewards/accuracies")
        ax2.set_ylabel("exact match" if not acc else "exact match / reward accuracy" if em else "reward accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return out_png
