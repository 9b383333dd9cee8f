"""How candidates are scored: gain per second, the metric a trial projects to a horizon, judging a race within
standard errors, and the discounted UCB bandit. Pure functions of the measured numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config import MemoryConfig
from .candidates import RaceTrial


def project_metric(
    start: float, mid: float, mid_s: float, end: float, end_s: float, horizon_s: float, ceiling: float | None = None,
    noise: float = 0.0,
) -> float:
    """The metric ``horizon_s`` seconds after a trial's end, if training went on the way the trial went.

    The trial's two halves give two rates. A second half slower than the first is read as an exponential
    approach to a ceiling, m(t) = A - (A - m0) e^(-kt), whose k follows from the ratio of the rates; the
    gain still to come is then bounded. Otherwise (a steady or accelerating gain, or a first half that dipped
    as parameters unfrozen with fresh optimizer state settle) the second half's rate is extended. A falling
    second half projects no further gain. ``ceiling`` (1 for an accuracy) caps the projection, so candidates
    that both still climb tie there, and the tie rule decides. ``noise`` is the metric's standard error: a
    slowdown is read as a ceiling only when it exceeds the noise of the two changes (one standard error of a
    difference each way), because a short trial's curvature is mostly noise and a wrong ceiling is costly.
    """
    first, second = mid_s, end_s - mid_s
    if first <= 0 or second <= 0:
        return end if ceiling is None else min(end, ceiling)
    r1, r2 = (mid - start) / first, (end - mid) / second
    slack = noise * math.sqrt(2.0)  # the standard error of a change between two evaluations
    if r2 <= 0:
        gain = 0.0
    elif (mid - start - slack) / first > (end - mid + slack) / second:
        k = math.log(r1 / r2) / ((first + second) / 2)  # the halves' mid-points are this far apart
        rate_at_end = r2 * k * second / math.expm1(k * second)  # the second half's mean rate, moved to its end
        gain = rate_at_end * -math.expm1(-k * horizon_s) / k
    else:
        gain = r2 * horizon_s
    return end + gain if ceiling is None else min(end + gain, ceiling)


def trial_gain(
    start: float, end: float, seconds: float, mid: tuple[float, float] | None = None, horizon_s: float | None = None,
    ceiling: float | None = None, noise: float = 0.0,
) -> tuple[float, float | None]:
    """A race trial's (gain per second, metric projected ``horizon_s`` ahead, or None).

    With a half-way ``mid`` = (metric, seconds), the gain is the second half's: a fast start that flattens
    out, or the dip of parameters unfrozen with fresh optimizer state, is not what the next minutes of
    training will see. Without one, the gain is over the whole trial and nothing is projected.
    """
    if mid is None or not seconds > mid[1]:
        return (end - start) / max(seconds, 1e-12), None
    gain = (end - mid[0]) / (seconds - mid[1])
    if horizon_s is None:
        return gain, None
    return gain, project_metric(start, mid[0], mid[1], end, seconds, horizon_s, ceiling, noise)


def judge_race(
    trials: Mapping[MemoryConfig, RaceTrial], trial_s: float | None, significance: float
) -> tuple[MemoryConfig, bool]:
    """The best metric projected to the race's horizon, or without projections (no half-way metric) the best
    gain per second; (winner, whether it won a tie: another candidate was within the tolerance).

    Gains are compared over the race's trial length ``trial_s``: a lead smaller than ``significance`` standard
    errors of the metric is a tie, and a tie goes to the least frozen candidate (then the earliest in the
    race). Short trials favour configurations that gain fast but stop early (a frozen body reaches a lower
    ceiling, and a trial that unfreezes parameters pays for their fresh optimizer state at once), so training
    fewer parameters has to win clearly.
    """
    if all(t.projected is not None for t in trials.values()):  # the metric each would reach by the horizon
        score = {c: t.projected for c, t in trials.items()}
    else:
        length = trial_s or 1.0
        score = {c: t.gain * length for c, t in trials.items()}
    leader = max(score, key=lambda c: score[c])
    tolerance = significance * (trials[leader].se or 0.0)
    tied = [c for c in score if score[c] >= score[leader] - tolerance]  # in race order
    winner = min(tied, key=lambda c: c.frozenness)
    return winner, len(tied) > 1  # a tie even when the least frozen also leads: the noise, not it, decided


def payback_seconds(cost_s: float, share: float) -> float:
    """Seconds of training after which ``cost_s`` of search is ``share`` of the whole."""
    return cost_s * (1 - share) / share


def relative_change(metric: float, previous: float) -> float:
    """|metric - previous| relative to |previous| (a drift detector's jump)."""
    return abs(metric - previous) / max(abs(previous), 1e-12)


# ---------------------------------------------------------------------------- the bandit


@dataclass
class ArmStats:
    """Discounted running estimate of one configuration's gain per second."""

    weight: float = 0.0
    total: float = 0.0
    trials: int = 0

    @property
    def mean(self) -> float | None:
        return self.total / self.weight if self.weight > 0 else None

    def add(self, gain: float) -> None:
        self.weight += 1.0
        self.total += gain
        self.trials += 1

    def discount(self, factor: float) -> None:
        self.weight *= factor
        self.total *= factor


def ucb_choice(arms: Sequence[tuple[MemoryConfig, ArmStats]], exploration: float) -> tuple[MemoryConfig, bool]:
    """Upper confidence bound on the gain per second; returns (choice, whether it is the best mean).

    The bonus is scaled by the largest |mean| so that ``exploration`` does not depend on the metric's units.
    An arm with no weight is chosen first (in the given order).
    """
    for config, stats in arms:
        if stats.mean is None:
            return config, False
    total = sum(s.weight for _, s in arms)
    scale = max(abs(s.mean) for _, s in arms) or 1e-12
    best_mean = max(arms, key=lambda a: a[1].mean)[0]
    scores = [
        s.mean + exploration * scale * math.sqrt(max(math.log(max(total, 1.0)), 0.0) / s.weight) for _, s in arms
    ]
    index = max(range(len(arms)), key=lambda i: scores[i])
    return arms[index][0], arms[index][0] == best_mean
