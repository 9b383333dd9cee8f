"""The engine's one owner of time: training seconds, seconds spent measuring the gain metric, the time budget
and the horizon of the current stretch. Counted from what the caller reports, never read from a wall clock, so
the engine is deterministic under a fake clock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SearchClock:
    """Seconds counted so far and seconds left."""

    time_budget_s: float | None = None  # training seconds the whole run may take (None: unbounded)
    elapsed_s: float = 0.0  # training seconds, race trials included
    search_seconds: float = 0.0  # spent measuring the gain metric (training time is in elapsed_s)
    last_eval_s: float | None = None  # how long the last measurement took
    horizon_s: float | None = None  # seconds (training and search) this stretch has, from horizon_from
    horizon_from: float = 0.0

    @property
    def out_of_time(self) -> bool:
        return self.time_budget_s is not None and self.elapsed_s >= self.time_budget_s

    @property
    def spent_s(self) -> float:
        """Training seconds (race trials included) plus the seconds spent measuring the gain metric."""
        return self.elapsed_s + self.search_seconds

    @property
    def time_left_s(self) -> float | None:
        """Seconds left to this stretch of training: the horizon's and ``time_budget_s``'s, whichever is shorter."""
        left = []
        if self.horizon_s is not None:
            left.append(self.horizon_s - (self.spent_s - self.horizon_from))
        if self.time_budget_s is not None:
            left.append(self.time_budget_s - self.elapsed_s)
        return min(left) if left else None

    def set_horizon(self, seconds: float | None) -> None:
        """From now on, ``seconds`` (training and search) are left (None: unknown)."""
        if seconds is not None and not seconds > 0:
            raise ValueError(f"RuleEngine.set_horizon needs seconds > 0 or None, got {seconds}.")
        self.horizon_s, self.horizon_from = seconds, self.spent_s

    def add_search_time(self, seconds: float) -> None:
        """``seconds`` were spent measuring the gain metric."""
        self.search_seconds += seconds
        self.last_eval_s = seconds
