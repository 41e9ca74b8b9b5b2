"""The end of a run: summary.json holds the counters and evals (without generated samples), the closing line
names only the files the run wrote, the headline metrics of every objective fit on one line."""
from __future__ import annotations

import json
from types import SimpleNamespace

from peftlab.metrics.console import setup_logging
from peftlab.trainer.early_stopping import EarlyStopping
from peftlab.trainer.state import TrainState
from peftlab.trainer.summary import finish, format_metrics, log_samples


def _recipe(out, *, plot=True, report_to=("jsonl",)):
    return SimpleNamespace(output_dir=out, output=SimpleNamespace(plot=plot, report_to=list(report_to)))


def test_headline_metrics_of_every_objective():
    assert format_metrics({"eval_loss": 1.23456, "perplexity": 3.4, "eval_tokens": 99}) == \
        "eval_loss=1.2346, perplexity=3.4000"
    assert format_metrics({"exact_match": 0.5, "token_f1": 0.75, "eval_loss": 2.0}) == \
        "exact_match=0.5000, token_f1=0.7500, eval_loss=2.0000"
    assert format_metrics({"accuracy": 0.9, "f1_macro": 0.8, "confusion_matrix": [[1]]}) == \
        "accuracy=0.9000, f1_macro=0.8000"
    assert format_metrics({"mse": 0.25, "r2": 0.5}) == "mse=0.2500"
    assert format_metrics({}) == "(no eval data)"


def test_summary_json_and_the_closing_lines(tmp_path, capsys):
    setup_logging("info")
    adapter = tmp_path / "adapter"
    state = TrainState(step=4, tokens_seen=321, skipped_steps=1)
    after = {"eval_loss": 1.5, "samples": [{"prompt": " 2+2? ", "reference": "4", "prediction": "5"}]}
    best = finish(_recipe(tmp_path, plot=False), state, before={"eval_loss": 2.0}, after=after, adapter_dir=adapter,
                  train_time_s=1.5, early_stopping=None, is_main=True)
    assert best is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"steps": 4, "tokens_seen": 321, "skipped_steps": 1, "train_time_s": 1.5,
                       "eval_before": {"eval_loss": 2.0}, "eval_after": {"eval_loss": 1.5}, "adapter": str(adapter)}
    assert capsys.readouterr().out == f"adapter (PEFT format): {adapter}\nmetrics: {tmp_path / 'metrics.jsonl'}\n"
    log_samples(after)
    assert capsys.readouterr().out == "sample: '2+2?'\n  reference:  '4'\n  generation: '5'\n"


def test_no_jsonl_means_no_curve_and_no_metrics_file_named(tmp_path, capsys):
    setup_logging("info")
    es = EarlyStopping(metric="loss", patience=1)
    es.update(2, {"eval_loss": 1.0})
    best = finish(_recipe(tmp_path, report_to=["tensorboard"]), TrainState(step=2), before={}, after={},
                  adapter_dir=tmp_path / "adapter", train_time_s=0.1, early_stopping=es, is_main=True)
    assert best["best_step"] == 2 and best["adapter"] == str(tmp_path / "best")
    out = capsys.readouterr().out
    assert f"best eval_loss=1.0 at step 2: {tmp_path / 'best'}\n" in out
    assert out.endswith("\nloss curve: not drawn (it is drawn from metrics.jsonl: add jsonl to output.report_to)\n")
    assert json.loads((tmp_path / "summary.json").read_text())["early_stopping"]["best"] == 1.0
    assert not (tmp_path / "loss_curve.png").exists()


def test_only_rank_0_writes_the_summary(tmp_path):
    finish(_recipe(tmp_path), TrainState(), before={}, after={}, adapter_dir=tmp_path / "a", train_time_s=0.0,
           early_stopping=None, is_main=False)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "loss_curve.png").exists()
