"""Experiment trackers behind ``output.report_to``: MLflow (local store) and Weights & Biases (offline).

:class:`peftlab.metrics.runlog.RunLog` writes JSONL and TensorBoard itself and forwards every record to the
trackers built here. Each tracker runs only when its package is installed; otherwise the run goes on
and one clear message says what to install. Nothing global is touched: MLflow is driven through an
``MlflowClient`` bound to ``sqlite:///<output.dir>/mlflow.db`` with artifacts in
``<output.dir>/mlartifacts`` (no active-run state, no environment variables; browse with
``mlflow ui --backend-store-uri sqlite:///<output.dir>/mlflow.db``), W&B through the run object that
``wandb.init(mode="offline", dir=<output.dir>)`` returns (sync it later with
``wandb sync <output.dir>/wandb/offline-run-*``).

What each receives: the recipe flattened to ``section.key`` params, every scalar figure as
``<split>/<name>`` at its optimizer step, and at the end the adapter directory and metrics.jsonl as
artifacts. A rank that the failure watch stops (another rank failed: :mod:`peftlab.engine.rank_failure`) leaves
through ``os._exit``; each tracker registers a closer for that case, which ends its run as failed (MLflow status
``FAILED``, W&B exit code 1) instead of leaving it "running" with its last records unsent.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Any

from peftlab.engine.rank_failure import close_before_stop

logger = logging.getLogger(__name__)

PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def scalars(split: str, figures: dict[str, Any]) -> dict[str, float]:
    return {f"{split}/{k}": float(v) for k, v in figures.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def mlflow_tracking_uri(out_dir: Path) -> str:
    """The run's local MLflow store: ``sqlite:///<out>/mlflow.db`` (MLflow 3 refuses the old ``./mlruns``
    file store unless an environment variable is set, which peftlab does not do behind a user's back)."""
    return "sqlite:///" + str((Path(out_dir) / "mlflow.db").resolve())


class _WatchedRun:
    """What every tracker's run shares: while it is open, the failure watch holds a closer that ends it as failed
    (:meth:`stopped`) if this process is stopped; :meth:`close` (the run finished) and :meth:`failed` (RunLog dropped
    the tracker after an error) end it first and take that closer back, so no run is ended twice."""

    def _watch(self) -> None:
        self._unregister = close_before_stop(self.stopped)

    def close(self) -> None:
        self._unregister()
        self.finished()

    def failed(self) -> None:
        """End the run as failed now: its records stop here, and it must not read as finished."""
        self._unregister()
        self.stopped()

    def finished(self) -> None:  # pragma: no cover - each tracker has its own
        raise NotImplementedError

    def stopped(self) -> None:  # pragma: no cover - each tracker has its own
        raise NotImplementedError


class MLflowTracker(_WatchedRun):
    """One MLflow run in a local store (``<out>/mlflow.db``, artifacts in ``<out>/mlartifacts``)."""

    def __init__(self, out_dir: Path, params: dict[str, Any], run_name: str, experiment: str = "peftlab"):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_tracking_uri(out_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            experiment, artifact_location=(Path(out_dir) / "mlartifacts").resolve().as_uri())
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        items = [Param(k, str(v)[:500]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self._watch()

    def log(self, step: int, split: str, figures: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars(split, figures).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: Path, name: str) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path))

    def finished(self) -> None:
        self.client.set_terminated(self.run_id)

    def stopped(self) -> None:
        """The failure watch is ending this process: the run failed."""
        self.client.set_terminated(self.run_id, status="FAILED")


class WandbTracker(_WatchedRun):
    """A W&B run in offline mode under ``<out>/wandb`` (no network, no login)."""

    def __init__(self, out_dir: Path, params: dict[str, Any], run_name: str, project: str = "peftlab"):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(mode="offline", dir=str(out_dir), project=project, name=run_name,
                              config=flatten(params), reinit="create_new")
        self._watch()

    def log(self, step: int, split: str, figures: dict[str, Any]) -> None:
        values = scalars(split, figures)
        if values:
            self.run.log(values, step=step)

    def log_artifact(self, path: Path, name: str) -> None:
        path = Path(path)
        art = self.wandb.Artifact(name, type="model" if path.is_dir() else "file")
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def finished(self) -> None:
        self.run.finish()

    def stopped(self) -> None:
        """The failure watch is ending this process: finish the run as failed (its buffered records are sent)."""
        self.run.finish(exit_code=1)


TRACKERS = {"mlflow": MLflowTracker, "wandb": WandbTracker}


def build_trackers(out_dir: Path, report_to: list[str], *, params: dict[str, Any] | None,
                   run_name: str | None = None) -> list[Any]:
    """The trackers of ``report_to`` whose packages are installed (a message names each missing one)."""
    out = []
    for name in report_to:
        if name not in TRACKERS:
            continue
        if importlib.util.find_spec(PACKAGES[name]) is None:
            logger.warning("output.report_to lists %s, but the %s package is not installed; not reporting to %s "
                           "(pip install %s, or remove %s from output.report_to)", name, PACKAGES[name], name,
                           PACKAGES[name], name)
            continue
        out.append(TRACKERS[name](Path(out_dir), params or {}, run_name or Path(out_dir).name))
    return out
