"""The ``ucb`` strategy: trials follow each other on the running weights and a discounted UCB bandit picks the
next. It needs no snapshot, but a trial's gain then depends on what the trial before it did."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config import MemoryConfig
from ..candidates import Choice, Outcome
from ..rules import group_key
from ..scoring import ucb_choice

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RuleEngine


class Bandit:
    """Each survivor is measured once (the engine's survivors due a trial), then UCB on the gain per second picks."""

    measures = True

    def __init__(self, engine: RuleEngine) -> None:
        self.engine = engine

    def start(self, step: int) -> Choice:
        return self.choose(step, "start")

    def wants_metric(self, step: int, retuned: bool) -> bool:
        return self.engine.trial_over(1.0)

    def on_metric(self, step: int, metric: float) -> Choice:
        self.engine.credit_trial(metric)
        return self.choose(step, "trial")

    def restart(self, step: int, reason: str, new_task: bool = False) -> Choice:
        return self.choose(step, reason)

    def on_infeasible(self, step: int, config: MemoryConfig, reason: str) -> Choice:
        return self.choose(step, reason, prefer_group_of=config)

    def choose(self, step: int, reason: str, prefer_group_of: MemoryConfig | None = None) -> Choice:
        """The next trial; after a configuration was marked infeasible, its group's next fastest."""
        e = self.engine
        if prefer_group_of is not None:  # survivors changed: re-prune, keeping the arms that remain
            e.reprune(reason)
            group = group_key(prefer_group_of)
            same = [c.config for c in e.survivors if group_key(c.config) == group]
            if same:
                return Choice(e.take_due(same[0]), Outcome.SAME_GROUP, reason)
            if e.best is not None:  # the set is gone: the best estimate so far
                return Choice(e.take_due(e.best), Outcome.EXPLOIT, f"{reason}: exploit best")
            return Choice(e.take_due(e.survivors[0].config), Outcome.MEASURE, f"{reason}: measure the fastest")
        due = e.next_due()
        if due is not None:
            return Choice(due, Outcome.MEASURE, f"{reason}: measure each candidate")
        choice, is_best = ucb_choice(list(e.arms.items()), e.exploration)
        if is_best:
            return Choice(choice, Outcome.EXPLOIT, f"{reason}: exploit best")
        return Choice(choice, Outcome.CHALLENGER, f"{reason}: re-measure challenger")
