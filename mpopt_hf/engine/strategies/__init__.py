"""Search strategies behind one protocol (`Strategy`), built by name from `STRATEGY_TYPES`."""

from __future__ import annotations

from .base import STRATEGY_TYPES, Strategy, register_strategy
from .fixed import FixedStrategy, HalvingStrategy
from .race import Race, RaceState
from .ucb import Bandit

register_strategy("race", Race)
register_strategy("ucb", Bandit)
register_strategy("fixed", FixedStrategy)
register_strategy("halving", HalvingStrategy)

__all__ = ["STRATEGY_TYPES", "Bandit", "FixedStrategy", "HalvingStrategy", "Race", "RaceState", "Strategy", "register_strategy"]
