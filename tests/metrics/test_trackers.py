"""Trackers: a training run's metrics read back from TensorBoard's event files and MLflow's local store
(sqlite; params and artifacts too); W&B offline when installed; a clear message when a package is missing."""
from __future__ import annotations

import importlib.util
import json
import logging

import pytest
from helpers import make_quickstart_data, tiny_recipe_dict

from peftlab.metrics.runlog import RunLog
from peftlab.recipe.parse import recipe_from_dict
from peftlab.trainer.loop import Trainer

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    data = make_quickstart_data(tmp / "data", n_train=16, n_eval=4)
    report_to = ["jsonl", "tensorboard"] + (["mlflow"] if HAS_MLFLOW else []) + (["wandb"] if HAS_WANDB else [])
    raw = tiny_recipe_dict(data, tmp / "out", quantization={"mode": "none"}, output={"report_to": report_to},
                           train={"max_steps": 3, "grad_accum": 1})
    raw["output"]["plot"] = False
    result = Trainer(recipe_from_dict(raw), quiet=True).train()
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    return result, records


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_run_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, records = run
    acc = EventAccumulator(str(result.output_dir / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    want = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    assert [s for s, _ in got] == [1, 2, 3] and [s for s, _ in want] == [1, 2, 3]
    assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(got, want))
    assert [e.step for e in acc.Scalars("eval/eval_loss")] == [0, 3]


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install mlflow; it is in the dev extra)")
@pytest.mark.slow
def test_mlflow_local_store_holds_params_metrics_and_artifacts(run):
    from mlflow.tracking import MlflowClient

    from peftlab.metrics.trackers import mlflow_tracking_uri

    result, records = run
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(result.output_dir))
    exp = client.get_experiment_by_name("peftlab")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.lr"] == "0.003" and mlrun.data.params["adapter.r"] == "8"
    history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "train/loss"))
    want = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    assert [s for s, _ in history] == [1, 2, 3]
    assert all(v == pytest.approx(w, rel=1e-12) for (_, v), (_, w) in zip(history, want))
    evals = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "eval/eval_loss"))
    assert evals[-1][1] == pytest.approx(result.eval_after["eval_loss"], rel=1e-12)
    files = {a.path for a in client.list_artifacts(mlrun.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in files and "adapter/adapter_config.json" in files


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed")
def test_wandb_offline_run_is_written(run):
    result, _ = run
    assert list((result.output_dir / "wandb").glob("offline-run-*"))


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed: the missing-package message cannot be shown")
def test_missing_tracker_package_gives_a_clear_message_and_the_run_goes_on(tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        log = RunLog(tmp_path, ["jsonl", "wandb"], params={"train": {"lr": 1.0}})
    log.log(1, "train", {"loss": 2.0})
    log.close()
    [record] = [r for r in caplog.records if r.name == "peftlab.metrics.trackers"]
    err = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "output.report_to lists wandb, but the wandb package is not installed" in err
    assert "pip install wandb" in err
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0
