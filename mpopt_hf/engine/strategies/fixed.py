"""Two strategies that compare nothing, so that what a user would run without the engine runs through the same
machinery (events, decisions, budget, checkpoints) and can be set beside ``race`` and ``ucb``:

* ``fixed``: the first candidate, all along; an out-of-memory error, or a budget it no longer fits, ends the run, as
  it would end a plain Trainer's;
* ``halving``: transformers' ``auto_find_batch_size`` without its restart: the largest micro-batch first, and after
  each out-of-memory error the largest one of at most half of it with the same other knobs; it never grows back.

Neither asks for the gain metric: no evaluation, no search time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config import MemoryConfig
from ..candidates import Choice, Outcome

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RuleEngine


class FixedStrategy:
    """Runs the first candidate and nothing else."""

    measures = False  # never asks for the gain metric

    def __init__(self, engine: RuleEngine) -> None:
        self.engine = engine

    def start(self, step: int) -> Choice:
        config = self.engine.candidates[0].config
        if config in self.engine.infeasible:
            raise RuntimeError(f"The fixed configuration {config.short()} is known not to fit "
                               f"({self.engine.infeasible[config]}); choose a smaller one.")
        return Choice(config, Outcome.FIXED, "start: the fixed configuration")

    def wants_metric(self, step: int, retuned: bool) -> bool:
        return False

    def on_metric(self, step: int, metric: float) -> Choice:
        return Choice(self.engine.current, Outcome.FIXED, "the fixed configuration")

    def restart(self, step: int, reason: str, new_task: bool = False) -> Choice:
        return Choice(self.engine.current, Outcome.FIXED, f"{reason}: the fixed configuration")

    def on_infeasible(self, step: int, config: MemoryConfig, reason: str) -> Choice:
        raise RuntimeError(f"strategy='fixed' cannot leave {config.short()}: {reason}. Choose a smaller configuration, "
                           "or let the engine choose (strategy='race' or 'ucb', or 'halving').")


class HalvingStrategy(FixedStrategy):
    """The largest micro-batch first; half of it (at most) after each out-of-memory error."""

    def start(self, step: int) -> Choice:
        usable = [c.config for c in self.engine.candidates if c.config not in self.engine.infeasible]
        if not usable:
            raise RuntimeError("strategy='halving': every candidate is known not to fit.")
        largest = max(usable, key=lambda c: c.micro_batch_size)  # the first of the largest, in the candidates' order
        return Choice(largest, Outcome.LARGEST, "start: the largest micro-batch")

    def restart(self, step: int, reason: str, new_task: bool = False) -> Choice:
        return Choice(self.engine.current, Outcome.FIXED, f"{reason}: the micro-batch halving reached")

    def on_infeasible(self, step: int, config: MemoryConfig, reason: str) -> Choice:
        half = config.micro_batch_size // 2
        smaller = [c.config for c in self.engine.candidates
                   if c.config not in self.engine.infeasible and c.config.micro_batch_size <= half
                   and c.config.replace(micro_batch_size=config.micro_batch_size) == config]
        if not smaller:
            raise RuntimeError(f"strategy='halving': no micro-batch of at most {half} is left beside "
                               f"{config.short()} ({reason}).")
        choice = max(smaller, key=lambda c: c.micro_batch_size)
        return Choice(choice, Outcome.HALVED, f"{reason}: halve the micro-batch")
