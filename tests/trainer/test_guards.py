"""Guards of the optimizer step: non-finite losses and gradients are skipped and counted (and abort after too
many in a row, before anything is saved), loss spikes warn or stop the run before the spiking update."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from peftlab.engine.interface import StepResult
from peftlab.errors import PeftlabError
from peftlab.metrics.console import setup_logging
from peftlab.trainer.guards import Guards
from peftlab.trainer.state import TrainState

pytestmark = pytest.mark.xdist_group("trainer")


def _config(**kw):
    return SimpleNamespace(**{"max_consecutive_nonfinite": 3, "loss_spike_factor": 2.0, "loss_spike_window": 3,
                              "loss_spike_action": "warn", **kw})


def test_spike_is_judged_against_the_median_of_a_full_window():
    guards, state = Guards(_config()), TrainState(recent_losses=[1.0, 3.0])
    assert guards.loss_spike(state, 100.0) is None  # the window is not full yet
    state.recent_losses = [1.0, 3.0, 2.0]
    assert guards.loss_spike(state, 4.0) is None  # 2x the median is not above it
    assert guards.loss_spike(state, 4.01) == ("loss spike: 4.0100 is 2.0x the median 2.0000 of the last 3 steps "
                                              "(guards.loss_spike_factor=2.0)")
    assert Guards(_config(loss_spike_action="off")).loss_spike(state, 1e9) is None
    verdict = Guards(_config(loss_spike_action="abort")).judge(state, 7, 9.0)
    assert verdict.skip and verdict.abort.startswith("training stopped at step 7: loss spike: 9.0000 is 4.5x")
    nan = guards.judge(state, 7, math.nan)
    assert nan.skip and not nan.finite_loss and nan.spike is None and nan.abort is None


def test_record_counts_skipped_steps_and_keeps_the_window_of_finite_losses(capsys):
    setup_logging("info")
    guards, state = Guards(_config()), TrainState()
    for step, loss in enumerate([2.0, 2.5, 3.0, 3.5], start=1):
        assert guards.record(state, step, loss, 10, guards.judge(state, step, loss), StepResult(1.0, False)) is None
    assert state.recent_losses == [2.5, 3.0, 3.5] and state.skipped_steps == 0
    assert guards.record(state, 5, 1.0, 0, guards.judge(state, 5, 1.0), StepResult(1.0, False)) is None
    assert state.recent_losses == [2.5, 3.0, 3.5]  # a step without targets says nothing about the loss
    stop = None
    for step in (6, 7, 8):
        stop = guards.record(state, step, math.inf, 10, guards.judge(state, step, math.inf),
                             StepResult(math.nan, True))
        assert (stop is None) == (step < 8)
    assert state.skipped_steps == 3 and state.nonfinite_streak == 3
    assert stop.startswith("training aborted: 3 optimizer steps in a row (steps 6-8) had a non-finite loss")
    err = capsys.readouterr().err
    assert "step 6: non-finite loss (loss=inf, grad_norm=nan); update skipped (1 in a row, 1 in all)" in err


def _inf_grad_at(trainer, steps) -> None:
    """Make the gradient of one LoRA weight infinite during the given (1-based) optimizer steps."""
    p = next(p for n, p in trainer.model.named_parameters() if p.requires_grad)
    p.register_hook(lambda g: torch.full_like(g, float("inf")) if trainer.state.step + 1 in steps else g)


def _steps(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_nonfinite_gradient_and_loss_are_skipped_and_counted(short_trainer, tmp_path, capsys):
    t = short_trainer(tmp_path / "o", train={"max_steps": 4})
    _inf_grad_at(t, {2})
    clean_loss = t.objective.loss

    def nan_loss_at_step_3(model, batch, **kw):
        loss = clean_loss(model, batch, **kw)
        return loss * float("nan") if t.state.step + 1 == 3 else loss

    t.objective.loss = nan_loss_at_step_3
    result = t.train()
    assert result.state.skipped_steps == 2 and result.state.step == 4
    records = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if r["split"] == "train"] == [False, True, True, False]
    # Two updates were applied (AdamW counts its steps per parameter).
    assert all(float(s["step"]) == 2 for s in t.engine.optimizer.state.values())
    assert all(torch.isfinite(p).all() for p in t.model.parameters() if p.requires_grad)
    err = capsys.readouterr().err
    assert "step 2: non-finite gradient norm" in err and "step 3: non-finite loss" in err
    # Saves due inside the streak were deferred to the next clean step.
    # (step 4 is the last: the final adapter, not a checkpoint, is written for it)
    assert _steps(tmp_path / "o" / "checkpoints") == ["step-0000001"]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["skipped_steps"] == 2


def test_repeated_nonfinite_steps_abort_without_saving(short_trainer, tmp_path):
    t = short_trainer(tmp_path / "o", train={"max_steps": 10}, guards={"max_consecutive_nonfinite": 3})
    _inf_grad_at(t, set(range(2, 11)))
    with pytest.raises(PeftlabError) as e:
        t.train()
    root = tmp_path / "o" / "checkpoints"
    assert str(e.value).startswith("training aborted: 3 optimizer steps in a row (steps 2-4) had a non-finite")
    assert f"the last complete checkpoint is {root / 'step-0000001'}" in str(e.value)
    assert _steps(root) == ["step-0000001"]
    assert not (tmp_path / "o" / "adapter").exists()


@pytest.mark.parametrize("action", ["warn", "abort"])
def test_loss_spike_watchdog(short_trainer, tmp_path, capsys, action):
    t = short_trainer(tmp_path / "o", train={"max_steps": 5, "save_every": None},
                      guards={"loss_spike_window": 2, "loss_spike_factor": 2.0, "loss_spike_action": action})
    clean_loss = t.objective.loss
    t.objective.loss = lambda model, batch, **kw: clean_loss(model, batch, **kw) * (
        10.0 if t.state.step + 1 == 4 else 1.0)
    if action == "warn":
        result = t.train()
        assert result.state.step == 5 and result.state.skipped_steps == 0
        assert "step 4: loss spike:" in capsys.readouterr().err
        return
    weights: dict[str, torch.Tensor] = {}
    step = t.engine.step

    def record_weights_then_step(**kw):
        weights.update({n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad})
        return step(**kw)

    t.engine.step = record_weights_then_step
    with pytest.raises(PeftlabError, match=r"training stopped at step 4: loss spike: .* the update was not applied"):
        t.train()
    assert t.state.step == 3
    for n, p in t.model.named_parameters():  # the spiking step left the weights as they were before it
        if p.requires_grad:
            assert torch.equal(p, weights[n])
