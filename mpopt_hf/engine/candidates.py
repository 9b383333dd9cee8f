"""What the engine chooses among and what it reports: candidates with their predicted cost, the cost model that
predicts it, the decisions it logs and the race trials it judges. Plain data: no rule lives here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Protocol

from ..config import MemoryConfig


class CostModel(Protocol):
    """What a configuration costs: ``(peak_bytes, step_seconds)``; either may be None when unknown."""

    def predict(self, config: MemoryConfig) -> tuple[float | None, float | None]: ...


class FunctionCostModel:
    """Adapts any ``config -> (peak_bytes, step_s)`` callable (e.g. a fitted memory model) to `CostModel`."""

    def __init__(self, fn: Callable[[MemoryConfig], tuple[float | None, float | None]]) -> None:
        self.fn = fn

    def predict(self, config: MemoryConfig) -> tuple[float | None, float | None]:
        return self.fn(config)


@dataclass(frozen=True)
class Candidate:
    """A configuration with its predicted cost (None = not predicted)."""

    config: MemoryConfig
    peak_bytes: float | None = None
    step_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "peak_bytes": self.peak_bytes, "step_s": self.step_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        return cls(MemoryConfig.from_dict(data["config"]), data["peak_bytes"], data["step_s"])


class DecisionKind(str, Enum):
    """What caused a decision: the event the engine was answering (tests and reports read this, not the prose)."""

    START = "start"  # before the first step
    TRIAL = "trial"  # a trial (or an exploitation) ended with its metric: next trial, race won, new race
    RETUNE = "retune"  # retune_every_steps re-opened the search
    DRIFT = "drift"  # the unsupervised proxy jumped
    TASK = "task"  # the online loop moved to a new task
    OOM = "oom"  # the step ran out of memory
    OVER_BUDGET = "over_budget"  # the step's measured peak exceeded the usable budget
    BUDGET = "budget"  # the memory budget changed
    STOP = "stop"  # training stopped mid-race


class Outcome(str, Enum):
    """What the engine chose (its `DecisionKind` says what it was answering): tests and reports read this."""

    RACE_TRIAL = "race_trial"  # a race trial begins (the first, or the next from the same weights)
    RACE_ROOM = "race_room"  # a race's first trial, among candidates narrowed to leave room for its host copies
    RACE_WON = "race_won"  # the race is over: its winner (or the fastest configuration learning the same) runs
    NO_RACE_COST = "no_race_cost"  # no race: it would cost over search_share of the time (or steps) left
    NO_RACE_ROOM = "no_race_room"  # no race: the budget leaves no room for its two host copies
    ONLY_CANDIDATE = "only_candidate"  # one feasible candidate: nothing to compare
    EXPLOITATION_OVER = "exploitation_over"  # the exploitation a race bought is over, and no new race pays
    KEEP_BEST = "keep_best"  # training stopped mid-race: the best trial that ended is kept
    KEEP_CURRENT = "keep_current"  # training stopped mid-race before any trial ended: the weights stay
    STILL_FITS = "still_fits"  # the budget changed and the configuration running still fits it
    MEASURE = "measure"  # ucb: a survivor not measured yet
    EXPLOIT = "exploit"  # ucb: the best estimate
    CHALLENGER = "challenger"  # ucb: a challenger, re-measured
    SAME_GROUP = "same_group"  # ucb, after a configuration was marked infeasible: its group's next fastest
    FIXED = "fixed"  # fixed (and halving between halvings): the configuration stays
    LARGEST = "largest"  # halving's start: the largest micro-batch
    HALVED = "halved"  # halving: the micro-batch was halved
    UNRECORDED = "unrecorded"  # a decision saved before outcomes were recorded


@dataclass(frozen=True)
class Choice:
    """A strategy's answer: the configuration to run, what kind of choice it is, and why in words (for logs)."""

    config: MemoryConfig
    outcome: Outcome
    why: str


@dataclass
class Decision:
    """One choice of the engine, as it is logged and written to decisions.json."""

    step: int
    elapsed_s: float  # training seconds counted by the engine (deterministic under a fake clock)
    config: dict[str, Any]
    predicted_peak_bytes: float | None
    measured_peak_bytes: float | None
    gain_estimate: float | None
    reason: str
    wall_time: float = field(default_factory=time.time)
    kind: str = DecisionKind.START.value  # a `DecisionKind` value
    budget_bytes: float | None = None  # the memory budget when it was taken
    outcome: str = Outcome.UNRECORDED.value  # an `Outcome` value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RaceTrial:
    """One race trial's outcome: gain per second, the metric at its end (and that metric's standard error),
    the training seconds it ran, and the metric projected to the race's horizon (see `project_metric`)."""

    gain: float
    metric: float
    seconds: float
    se: float | None = None
    projected: float | None = None
