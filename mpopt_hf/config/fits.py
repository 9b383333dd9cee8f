"""What "fits" means, once for every caller (the engine, the online loop's halving, the profiler's choice of what
to measure, ``mpopt profile``): the predicted peak is at most the budget less its safety margin."""

from __future__ import annotations

DEFAULT_SAFETY_MARGIN = 0.05  # MPOptArguments.safety_margin's default, also ``mpopt profile --safety-margin``'s


def usable_bytes(budget_bytes: float | None, margin: float) -> float | None:
    """The budget less its safety margin (None: no budget)."""
    return None if budget_bytes is None else budget_bytes * (1.0 - margin)


def fits(peak_bytes: float | None, budget_bytes: float | None, margin: float) -> bool:
    """Whether a predicted peak fits the budget less its margin; without a budget or a prediction, it does."""
    limit = usable_bytes(budget_bytes, margin)
    return limit is None or peak_bytes is None or peak_bytes <= limit


def min_fitting_budget(peak_bytes: float, margin: float) -> float:
    """The smallest budget that ``peak_bytes`` fits once the margin is taken off."""
    return peak_bytes / (1.0 - margin)
