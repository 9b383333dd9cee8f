"""Step times learned online: the cost model's predictions corrected by the steps training runs anyway.

The fit times few steps (one per measured configuration), so its step-time predictions can be far off (+62 %
and -45 % seen on real-size models); pruning and race order rest on them. Every untimed-by-tracking optimizer
step of the current configuration is an observation: a configuration seen at least `min_samples` times is
priced by its own mean (with its standard error), and every other by its prediction times the median ratio
measured / predicted over the configurations seen, so one run's machine speed carries to the configurations
not yet run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from ..config import MemoryConfig


@dataclass
class TimeSamples:
    """Running count, mean and sum of squared deviations (Welford) of one configuration's step seconds."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, seconds: float) -> None:
        self.n += 1
        delta = seconds - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (seconds - self.mean)

    @property
    def se(self) -> float | None:
        """Standard error of the mean (None below two samples)."""
        return math.sqrt(self.m2 / (self.n - 1) / self.n) if self.n > 1 else None


@dataclass
class StepTimeLearner:
    """Corrects predicted step seconds per configuration from observed ones."""

    predicted: dict[MemoryConfig, float | None]
    min_samples: int = 2
    samples: dict[MemoryConfig, TimeSamples] = field(default_factory=dict)

    def observe(self, config: MemoryConfig, seconds: float) -> None:
        if seconds > 0 and math.isfinite(seconds):
            self.samples.setdefault(config, TimeSamples()).add(seconds)

    def ratio(self) -> float | None:
        """Median measured / predicted over the configurations seen enough (None before any)."""
        ratios = [s.mean / p for c, s in self.samples.items()
                  if s.n >= self.min_samples and (p := self.predicted.get(c))]
        return statistics.median(ratios) if ratios else None

    def corrected(self, config: MemoryConfig) -> float | None:
        """Seconds per step of ``config``: its own mean once seen enough, else the prediction scaled by `ratio`."""
        seen = self.samples.get(config)
        if seen is not None and seen.n >= self.min_samples:
            return seen.mean
        prior = self.predicted.get(config)
        ratio = self.ratio()
        return prior if prior is None or ratio is None else prior * ratio

    def state_dict(self) -> dict[str, Any]:
        return {"samples": [[c.to_dict(), s.n, s.mean, s.m2] for c, s in self.samples.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = {MemoryConfig.from_dict(c): TimeSamples(n, mean, m2) for c, n, mean, m2 in state["samples"]}
