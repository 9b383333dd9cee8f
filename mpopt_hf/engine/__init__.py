"""The rule engine: which configuration to run, as plain rules on numbers.

Rules, in order (`rules`): a configuration must fit the budget (*feasibility*); among those with the same
trainable set and precision only the fastest is worth a trial (*dominance*); BatchNorm models never train on
tiny micro-batches; the survivors are compared by *accuracy gain per second* of training, measured in short
trials (`scoring`); drift re-opens the search with older estimates discounted; an out-of-memory error removes
the configuration and everything predicted larger.

Two strategies compare the survivors (`strategies`). ``race`` (the default): every survivor trains for the
same seconds *from the same weights* (the caller snapshots and restores them when the engine asks, see
`RuleEngine.take_ops`), each is judged by the metric it would reach by the race's horizon (its two halves tell
a climb that goes on from one that flattens out, `project_metric`), the winner's end state is kept and
exploited, and the race is re-run from the current weights once its cost has been paid back
``1/search_share`` times over. When the time left is known (``time_budget_s``, or a horizon such as a
wall-clock slot, see `RuleEngine.set_horizon`; `clock` counts it), a race is only run if its estimated cost
is at most ``search_share`` of that time; otherwise the incumbent goes on, or, with none yet, the least frozen
of the fastest candidates, whose accuracy freezing does not cap. ``ucb``: trials follow each other on the
running weights and a discounted UCB bandit picks the next; it needs no snapshot, but a trial's gain then
depends on what the trial before it did. Nothing here imports torch or touches a model: the callback feeds
numbers in and applies the configurations that come out: `RuleEngine.step` takes an event (`events`) and answers
the actions to carry out.
"""

from __future__ import annotations

from ..config import MIB
from .candidates import (
    Candidate,
    Choice,
    CostModel,
    Decision,
    DecisionKind,
    FunctionCostModel,
    Outcome,
    RaceTrial,
)
from .clock import SearchClock
from .engine import RuleEngine
from .events import (
    Action,
    Baseline,
    BudgetChanged,
    Drop,
    Evaluate,
    Event,
    Metric,
    OutOfMemory,
    Restore,
    Run,
    Snapshot,
    Start,
    StepBegin,
    StepDone,
    Stop,
    TaskBoundary,
    TrainEnd,
)
from .rules import _speed_key as _speed_key  # importable from here before the split
from .rules import batchnorm_filter, dominance_prune, feasible, prune, usable_bytes
from .scoring import ArmStats, project_metric, ucb_choice
from ..space import (
    default_checkpoint_segments,
    default_freeze_rates,
    default_micro_batch_sizes,
    enumerate_configs,
)
from .strategies import STRATEGY_TYPES, Strategy

__all__ = [
    "Action",
    "Baseline",
    "BudgetChanged",
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
    "MIB",
    "STRATEGY_TYPES",
    "ArmStats",
    "Candidate",
    "Choice",
    "CostModel",
    "Decision",
    "DecisionKind",
    "FunctionCostModel",
    "Outcome",
    "RaceTrial",
    "RuleEngine",
    "SearchClock",
    "Strategy",
    "batchnorm_filter",
    "default_checkpoint_segments",
    "default_freeze_rates",
    "default_micro_batch_sizes",
    "dominance_prune",
    "enumerate_configs",
    "feasible",
    "project_metric",
    "prune",
    "ucb_choice",
    "usable_bytes",
]
