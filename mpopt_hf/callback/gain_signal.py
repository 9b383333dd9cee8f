"""The gain signal as the callback feeds it to the engine: the metric on evaluation data (`GainMeter`) or, for
``'train_loss'``, the steps' own losses (`TrainLossGain`), and whether the current data still needs its baseline.

Every rank must hand its engine the same numbers, so the callback's reductions over ranks come in as callables;
the evaluation's time is search cost, which the callback hands to the engine with the metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..engine import RuleEngine
from .gain import METRIC_CEILING, GainMeter
from .train_loss_gain import TrainLossGain


@dataclass
class GainSignal:
    """The metric in use, its evaluation batch, the training losses seen and the pending-baseline flag."""

    meter: GainMeter
    reduce: Callable[[float, str], float]  # a number over ranks ("sum", "max", "min")
    reduce_sums: Callable[[torch.Tensor], list[float]]  # per-rank sums, added over ranks
    train_loss: TrainLossGain = field(default_factory=TrainLossGain)
    needs_baseline: bool = False  # the current data's metric has not been measured yet

    @property
    def metric(self) -> str:
        return self.meter.metric

    @property
    def ceiling(self) -> float | None:
        """The metric's best value (1 for accuracy; None: unbounded), at which the engine caps its projections."""
        return METRIC_CEILING.get(self.metric)

    def resolve(self, requested: str, model: nn.Module, trainer: Any, eval_dataset: Any) -> None:
        """Choose the metric ('auto' by what the data and the model offer)."""
        self.meter.resolve(requested, model, trainer, eval_dataset)

    def restore(self, metric: str, eval_chunk: int | None, needs_baseline: bool) -> None:
        """The metric a resumed run was using, as its checkpoint recorded it."""
        self.meter.metric, self.meter.eval_chunk = metric, eval_chunk
        self.needs_baseline = needs_baseline

    def saved(self) -> dict[str, Any]:
        """What a checkpoint keeps of it, beside the engine's state."""
        return {"metric": self.metric, "eval_chunk": self.meter.eval_chunk, "needs_baseline": self.needs_baseline}

    def observe_train_loss(self, trainer: Any, engine: RuleEngine) -> float | None:
        """Add this step's training loss (the mean over ranks); returns the baseline the engine is owed, if any: the
        first step of a race (or of a task) sets its start, measured on the start weights before their first
        update."""
        loss = trainer.last_step_loss
        self.train_loss.add(None if loss is None else self.reduce(loss, "sum") / trainer.args.world_size)
        starting = engine.awaits_race_start
        if (starting or self.needs_baseline or engine.baseline is None) and self.train_loss.last is not None:
            self.needs_baseline = False
            return -self.train_loss.last
        return None

    def measure(self, model: nn.Module, trainer: Any, eval_dataset: Any, trial_steps_done: int,
                clock: Callable[[], float]) -> tuple[float | None, float | None, float]:
        """(mean score, its standard error, seconds) over the evaluation data and all ranks (`GainMeter.measure`).
        Its time (the slowest rank's, so that every rank's engine sizes its trials alike) is search cost. For
        'train_loss', the current trial's later steps' losses (``trial_steps_done`` of them): no evaluation, no
        search time."""
        if self.metric == "train_loss":
            return (*self.train_loss.metric(trial_steps_done), 0.0)
        start = clock()
        value, se = self.meter.measure(model, trainer, eval_dataset, self.reduce_sums)
        return value, se, self.reduce(clock() - start, "max")
