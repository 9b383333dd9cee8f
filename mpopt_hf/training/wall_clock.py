"""Stop training after a number of wall-clock seconds: how a deployed device retrains, and how runs compare.

A device that retrains between two deployments has a time slot, not a step count; and two methods are
only compared fairly at equal time, because a faster configuration's advantage *is* its extra steps. The
clock runs from the first step's start and counts everything the Trainer does in between (steps, the
engine's evaluations and trials, logging). Call `start` to begin it earlier, e.g. when a task begins, so
that what a method does before its first step (choosing a configuration, fitting a cost model) is counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from transformers import TrainerCallback


class WallClockLimit(TrainerCallback):
    """Ends training at the first step end after ``seconds`` of wall-clock time since the first step began."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter) -> None:
        if not seconds > 0:
            raise ValueError(f"WallClockLimit needs seconds > 0, got {seconds}.")
        self.seconds, self.clock = float(seconds), clock
        self.started: float | None = None
        self.stopped_early = False
        self._started_by_caller = False

    def start(self) -> "WallClockLimit":
        """Start the clock now, before training begins; the next ``train()`` keeps it running."""
        self.started, self._started_by_caller = self.clock(), True
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._started_by_caller:
            self.started = None  # re-armed for each train() of a reused callback
        self._started_by_caller, self.stopped_early = False, False
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.started is None:
            self.started = self.clock()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.started is not None and self.clock() - self.started >= self.seconds:
            control.should_training_stop = True
            self.stopped_early = True
        return control

    @property
    def elapsed(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started


__all__ = ["WallClockLimit"]
