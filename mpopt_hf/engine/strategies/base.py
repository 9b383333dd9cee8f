"""The protocol every search strategy follows, and the registry the engine builds its strategy from."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ...config import MemoryConfig
from ..candidates import Choice

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RuleEngine


class Strategy(Protocol):
    """How the survivors are compared. The engine keeps the counts, the clock and the survivors (it reprunes them,
    credits gains and hands out the survivors due a trial through its methods); a strategy is told what happened
    and answers a `Choice`: the configuration to run next, its `Outcome` and why. The engine records it as a
    `Decision`; None means that nothing changes and nothing is recorded.
    ``measures``: whether it compares configurations by the gain metric (False: no evaluation is ever spent)."""

    measures: bool

    def start(self, step: int) -> Choice:
        """The first configuration, the gain metric before training being the engine's baseline."""
        ...

    def wants_metric(self, step: int, retuned: bool) -> bool | Choice:
        """After a step (``retuned``: the search was just re-opened): whether the gain metric is wanted now; a
        `Choice` means not now, and that choice is recorded (e.g. an exploitation that goes on, and why)."""
        ...

    def on_metric(self, step: int, metric: float) -> Choice | None:
        """The gain metric that was asked for; answers what to run next."""
        ...

    def restart(self, step: int, reason: str, new_task: bool = False) -> Choice:
        """The search was re-opened (drift, or a new task): begin comparing the survivors again."""
        ...

    def on_infeasible(self, step: int, config: MemoryConfig, reason: str) -> Choice:
        """``config`` (and perhaps others) was marked infeasible: go on without it."""
        ...


STRATEGY_TYPES: dict[str, Callable[[RuleEngine], Strategy]] = {}


def register_strategy(name: str, build: Callable[[RuleEngine], Strategy]) -> None:
    """Make ``name`` a value of ``MPOptArguments.strategy``; a name is registered once."""
    if name in STRATEGY_TYPES:
        raise ValueError(f"A search strategy named {name!r} is already registered ({STRATEGY_TYPES[name]}).")
    STRATEGY_TYPES[name] = build
