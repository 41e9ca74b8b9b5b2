"""The run log: one JSON line per record in metrics.jsonl, TensorBoard scalars, a refused write that names its
file, and the loss-curve PNG drawn from the JSONL (replaced atomically)."""
from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest

from peftlab.metrics.runlog import RunLog, append_line, plot_loss_curve, read_metrics


def test_each_record_is_one_json_line(tmp_path):
    log = RunLog(tmp_path, ["jsonl"])
    log.log(1, "train", {"loss": 2.5, "lr": 1e-4, "tokens": 96})
    log.log(1, "eval", {"eval_loss": 2.0, "samples": [{"prompt": "p"}], "device": object()})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "split": "train", "loss": 2.5, "lr": 1e-4, "tokens": 96},
        {"step": 1, "split": "eval", "eval_loss": 2.0, "samples": [{"prompt": "p"}]},  # what JSON cannot hold: left out
    ]
    assert read_metrics(tmp_path / "metrics.jsonl") == [json.loads(line) for line in lines]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_disabled_or_not_asked_writes_nothing(tmp_path):
    for out, kwargs in ((tmp_path / "rank1", {"enabled": False}), (tmp_path / "tb-only", {})):
        out.mkdir()
        log = RunLog(out, ["jsonl", "tensorboard"] if kwargs else [], **kwargs)
        log.log(1, "train", {"loss": 1.0})
        log.close()
        assert list(out.iterdir()) == []


def test_tensorboard_gets_the_finite_numbers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, ["tensorboard"])
    log.log(1, "train", {"loss": 2.5, "grad_norm": math.nan, "skipped": True, "note": "x"})
    log.log(2, "train", {"loss": 2.0})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]


def test_a_resumed_run_replaces_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path):
    """A run interrupted at step 10 whose last checkpoint is step 5 logs steps 6.. again when resumed: TensorBoard
    shows each step once, the resumed run's value after the checkpoint (not two overlapping curves)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunLog(tmp_path, ["tensorboard"])
    for step in range(1, 11):
        first.log(step, "train", {"loss": 10.0 - step})
    first.close()
    resumed = RunLog(tmp_path, ["tensorboard"], resumed_step=5)
    for step in range(6, 9):
        resumed.log(step, "train", {"loss": 100.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == (
        [(s, 10.0 - s) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 9)])


def test_a_refused_append_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"a": 1}')
    append_line(path, '{"a": 2}')
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'

    class FullDisk:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")  # a failed write carries no file name

    monkeypatch.setattr(Path, "open", lambda self, mode="r": FullDisk())
    with pytest.raises(OSError) as err:
        append_line(path, "{}")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(path))


def test_loss_curve_png(tmp_path):
    import matplotlib.image

    metrics = tmp_path / "metrics.jsonl"
    png = tmp_path / "loss_curve.png"
    assert plot_loss_curve(metrics, png) is None and not png.exists()  # no train loss: no picture
    records = [{"step": s, "split": "train", "loss": 3.0 / s} for s in range(1, 6)]
    records += [{"step": 5, "split": "eval", "eval_loss": 0.9, "exact_match": 0.5}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    png.write_bytes(b"an older picture")
    assert plot_loss_curve(metrics, png) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[:2] == (440, 770)  # 7 x 4 inches at 110 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png", "metrics.jsonl"]  # no temporary left


def test_loss_curve_shows_a_preference_runs_reward_accuracy(tmp_path):
    import matplotlib.image
    import numpy as np

    def red_pixels(records):
        metrics, png = tmp_path / "metrics.jsonl", tmp_path / "curve.png"
        metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
        img = matplotlib.image.imread(plot_loss_curve(metrics, png))[..., :3]
        return int((np.abs(img - np.array([0.839, 0.153, 0.157])).max(-1) < 0.05).sum())  # tab:red

    train = [{"step": s, "split": "train", "loss": 0.7 / s} for s in range(1, 6)]
    evals = [{"step": s, "split": "eval", "eval_loss": 0.6, "eval_rewards/accuracies": s / 5} for s in (1, 5)]
    assert red_pixels(train) == 0 and red_pixels(train + evals) > 20
