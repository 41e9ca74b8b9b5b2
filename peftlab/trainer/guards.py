"""Guards of the optimizer step: non-finite losses and gradients, and loss spikes.

A step whose loss or gradient norm is not finite is not applied (the weights and optimizer moments stay as they
were; the schedule advances) and is counted in ``skipped_steps``; ``guards.max_consecutive_nonfinite`` of them
in a row stop the run. A finite loss above ``guards.loss_spike_factor`` x the median of the last
``guards.loss_spike_window`` steps is a spike: named in a warning (``loss_spike_action: warn``), or the run
stops before the step is applied (``abort``). A stopping guard gives the message; the loop raises it.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from typing import Any

from peftlab.engine.interface import StepResult
from peftlab.trainer.state import TrainState

logger = logging.getLogger(__name__)


@dataclass
class Verdict:
    """The guards' view of a step's loss before the update."""

    finite_loss: bool
    spike: str | None = None   # the spike's description
    abort: str | None = None   # set: the update must not be applied and the run stops with this message

    @property
    def skip(self) -> bool:
        """Drop the update (the engine still advances the schedule)."""
        return not self.finite_loss or self.abort is not None


class Guards:
    """The recipe's ``guards`` section applied to each step (state lives in :class:`TrainState`)."""

    def __init__(self, config: Any):
        self.config = config

    def loss_spike(self, state: TrainState, loss: float) -> str | None:
        """A description of the spike when ``loss`` exceeds factor x the running median, else None."""
        g = self.config
        window = state.recent_losses
        if g.loss_spike_action == "off" or len(window) < g.loss_spike_window:
            return None
        median = statistics.median(window)
        if median > 0 and loss > g.loss_spike_factor * median:
            return (f"loss spike: {loss:.4f} is {loss / median:.1f}x the median {median:.4f} of the last "
                    f"{len(window)} steps (guards.loss_spike_factor={g.loss_spike_factor})")
        return None

    def judge(self, state: TrainState, step: int, loss: float) -> Verdict:
        """Before the update of ``step``: whether to apply it and whether the run stops."""
        finite = math.isfinite(loss)
        spike = self.loss_spike(state, loss) if finite else None
        abort = None
        if spike is not None and self.config.loss_spike_action == "abort":
            abort = (f"training stopped at step {step}: {spike} (guards.loss_spike_action=abort); the update was "
                     "not applied. Lower train.lr or raise guards.loss_spike_factor, then rerun with resume: auto")
        return Verdict(finite, spike, abort)

    def record(self, state: TrainState, step: int, loss: float, n_targets: int, verdict: Verdict,
               result: StepResult) -> str | None:
        """After ``step`` counted: update the counters and the spike window, warn; the message that stops the
        run when too many steps in a row were not finite, else None."""
        g = self.config
        if result.skipped:
            state.skipped_steps += 1
            state.nonfinite_streak += 1
            logger.warning(f"step {step}: non-finite {'loss' if not verdict.finite_loss else 'gradient norm'} "
                           f"(loss={loss}, grad_norm={result.grad_norm}); update skipped "
                           f"({state.nonfinite_streak} in a row, {state.skipped_steps} in all)")
            if state.nonfinite_streak >= g.max_consecutive_nonfinite:
                first = step - state.nonfinite_streak + 1
                return (f"training aborted: {state.nonfinite_streak} optimizer steps in a row (steps {first}-{step}) "
                        f"had a non-finite loss or gradient (guards.max_consecutive_nonfinite="
                        f"{g.max_consecutive_nonfinite}). Lower train.lr, check the data rows of those steps, or "
                        "use model.dtype: float32, then rerun with resume: auto")
            return None
        state.nonfinite_streak = 0
        if n_targets:
            state.recent_losses = (state.recent_losses + [loss])[-g.loss_spike_window:]
        if verdict.spike is not None:
            logger.warning(f"step {step}: {verdict.spike} (guards.loss_spike_action=warn)")
        return None
