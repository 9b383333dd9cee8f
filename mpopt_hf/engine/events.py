"""What the engine hears and what it answers: events in, actions out (`RuleEngine.step`).

The caller (the callback, the online loop, a test on simulated curves) turns what happened into an event and carries
out the actions that come back, in order. Every event carries the Trainer step it happened at and the Trainer steps
left to the run (None: unknown), which is what a race costs under ``gain_per="step"``; at a `TaskBoundary` they are
the new task's.

The race's copies of the training state are asked for by `Snapshot`, `Restore` and `Drop`. They are released only at
the step boundaries where the caller can act on the weights: `StepBegin`, `OutOfMemory` (the partial step is undone
before the step runs again) and `TrainEnd`; until then they wait in the engine's saved state, so a checkpoint taken
in between resumes with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import MemoryConfig

Copy = Literal["start", "best"]  # the race's start, and the best trial's end state so far


# ---------------------------------------------------------------------------- events in


@dataclass(frozen=True, kw_only=True)
class Event:
    step: int
    steps_left: int | None = None


@dataclass(frozen=True, kw_only=True)
class Start(Event):
    """Training begins: the gain metric before any step (``se``: its standard error), measured in ``eval_s``
    seconds; ``horizon_s``: seconds left to the run (a wall-clock slot), None when unknown."""

    metric: float | None
    se: float | None = None
    eval_s: float = 0.0
    horizon_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class StepBegin(Event):
    """A step is about to run: the pending copy operations are released."""


@dataclass(frozen=True, kw_only=True)
class StepDone(Event):
    """One optimizer step took ``seconds`` and peaked at ``peak_bytes`` (None: not measured); ``timed`` is False when
    measuring its memory slowed it, so its time says nothing of the configuration's."""

    seconds: float
    peak_bytes: float | None = None
    timed: bool = True


@dataclass(frozen=True, kw_only=True)
class Metric(Event):
    """The gain metric asked for by `Evaluate` (higher is better), measured in ``eval_s`` seconds; ``proxy``: a
    label-free proxy whose jump means drift."""

    value: float
    se: float | None = None
    proxy: bool = False
    eval_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Baseline(Event):
    """The gain metric on the current weights and data, from which the next trial's gain counts."""

    value: float
    se: float | None = None
    eval_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class OutOfMemory(Event):
    """``config`` ran out of memory in this step; the step runs again with the configuration answered."""

    config: MemoryConfig


@dataclass(frozen=True, kw_only=True)
class TaskBoundary(Event):
    """The data changed (a new task of the stream); ``horizon_s``: the new task's seconds, if known."""

    horizon_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class BudgetChanged(Event):
    """The memory budget is now ``budget_bytes`` (None: no budget), read at a step boundary."""

    budget_bytes: float | None


@dataclass(frozen=True, kw_only=True)
class TrainEnd(Event):
    """Training stopped (its end, a limit, or mid-race)."""


# ---------------------------------------------------------------------------- actions out


@dataclass(frozen=True)
class Action:
    pass


@dataclass(frozen=True)
class Run(Action):
    """Train with ``config`` from the next step on."""

    config: MemoryConfig


@dataclass(frozen=True)
class Evaluate(Action):
    """Measure the gain metric now and answer with a `Metric` event."""


@dataclass(frozen=True)
class Snapshot(Action):
    """Copy the training state (weights, optimizer and scheduler state) as ``which``."""

    which: Copy


@dataclass(frozen=True)
class Restore(Action):
    """Load the copy ``which`` into the training state."""

    which: Copy


@dataclass(frozen=True)
class Drop(Action):
    """Forget both copies: the race is over."""


@dataclass(frozen=True)
class Stop(Action):
    """The engine's time is spent: stop training."""


# the race's queued operations, as its saved state has always named them
_COPY_OPS: dict[str, Action] = {
    "snapshot": Snapshot("start"),
    "save_best": Snapshot("best"),
    "restore_start": Restore("start"),
    "restore_best": Restore("best"),
    "drop": Drop(),
}


def copy_actions(ops: list[str]) -> list[Action]:
    """The actions of the race's queued operations, in order."""
    unknown = [op for op in ops if op not in _COPY_OPS]
    if unknown:
        raise ValueError(f"Unknown engine state operation(s) {unknown}; known: {sorted(_COPY_OPS)}.")
    return [_COPY_OPS[op] for op in ops]


__all__ = [
    "Action",
    "Baseline",
    "BudgetChanged",
    "Copy",
    "Drop",
    "Evaluate",
    "Event",
    "Metric",
    "OutOfMemory",
    "Restore",
    "Run",
    "Snapshot",
    "Start",
    "StepBegin",
    "StepDone",
    "Stop",
    "TaskBoundary",
    "TrainEnd",
    "copy_actions",
]
