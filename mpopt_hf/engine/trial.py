"""Where the current trial stands: plain data the engine keeps and saves (its fields are the state's keys)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrialCounts:
    """The current trial's counts and the gain metric it is measured against."""

    baseline: float | None = None  # the metric the trial started from
    last_metric: float | None = None
    last_se: float | None = None  # the last metric's standard error over the evaluation items
    trial_seconds: float = 0.0
    trial_steps_done: int = 0
    last_retune_step: int = 0
    last_peak: float | None = None  # the last step's measured peak bytes
