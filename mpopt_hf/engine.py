"""The rule engine: which configuration to run, as plain rules on numbers.

Rules, in order: a configuration must fit the budget (*feasibility*); among those with the same trainable
set and precision only the fastest is worth a trial (*dominance*); BatchNorm models never train on
tiny micro-batches; the survivors are compared by *accuracy gain per second* of training, measured in
short trials; drift re-opens the search with older estimates discounted; an out-of-memory error removes
the configuration and everything predicted larger.

Two strategies compare the survivors. ``race`` (the default): every survivor trains for the same seconds
*from the same weights* (the caller snapshots and restores them when the engine asks, see `RuleEngine.ops`),
each is judged by the metric it would reach by the race's horizon (its two halves tell a climb that goes on
from one that flattens out, `project_metric`), the winner's end state is kept and exploited, and the race is
re-run from the current weights once its cost has been paid back ``1/search_share`` times over.
When the time left is known (``time_budget_s``, or a horizon such as a wall-clock slot, see `set_horizon`),
a race is only run if its estimated cost is at most ``search_share`` of that time; otherwise the incumbent
goes on, or, with none yet, the least frozen of the fastest candidates, whose accuracy freezing does not cap.
``ucb``: trials follow each other on the running weights and a discounted UCB bandit picks the next; it needs
no snapshot, but a trial's gain then depends on what the trial before it did. Nothing here imports torch or touches a model: the
callback feeds numbers in and applies the configurations that come out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .config import DEFAULT_SEARCH_SHARE, STRATEGIES, MemoryConfig

MIB = 2**20


class CostModel(Protocol):
    """What a configuration costs: ``(peak_bytes, step_seconds)``; either may be None when unknown."""

    def predict(self, config: MemoryConfig) -> tuple[float | None, float | None]: ...


class FunctionCostModel:
    """Adapts any ``config -> (peak_bytes, step_s)`` callable (e.g. a fitted memory model) to `CostModel`."""

    def __init__(self, fn: Callable[[MemoryConfig], tuple[float | None, float | None]]) -> None:
        self.fn = fn

    def predict(self, config: MemoryConfig) -> tuple[float | None, float | None]:
        return self.fn(config)


@dataclass(frozen=True)
class Candidate:
    """A configuration with its predicted cost (None = not predicted)."""

    config: MemoryConfig
    peak_bytes: float | None = None
    step_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "peak_bytes": self.peak_bytes, "step_s": self.step_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Candidate":
        return cls(MemoryConfig.from_dict(data["config"]), data["peak_bytes"], data["step_s"])


@dataclass
class Decision:
    """One choice of the engine, as it is logged and written to decisions.json."""

    step: int
    elapsed_s: float  # training seconds counted by the engine (deterministic under a fake clock)
    config: dict[str, Any]
    predicted_peak_bytes: float | None
    measured_peak_bytes: float | None
    gain_estimate: float | None
    reason: str
    wall_time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RaceTrial:
    """One race trial's outcome: gain per second, the metric at its end (and that metric's standard error),
    the training seconds it ran, and the metric projected to the race's horizon (see `project_metric`)."""

    gain: float
    metric: float
    seconds: float
    se: float | None = None
    projected: float | None = None


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


# ---------------------------------------------------------------------------- the search space


def enumerate_configs(
    micro_batch_sizes: Iterable[int],
    freeze_rates: Iterable[float],
    checkpoint_segments: Iterable[int],
    precisions: Iterable[str],
    n_blocks: int,
) -> list[MemoryConfig]:
    """Every combination that is valid for a model with ``n_blocks`` blocks (segments <= trainable blocks)."""
    from .knobs import n_frozen_blocks  # pure arithmetic; knobs imports torch only for its own functions

    configs = []
    for precision in precisions:
        for rate in sorted(set(float(r) for r in freeze_rates)):
            trainable = n_blocks - n_frozen_blocks(rate, n_blocks)
            for segments in sorted(set(checkpoint_segments)):
                if segments > trainable:
                    continue
                for mb in sorted(set(micro_batch_sizes), reverse=True):
                    configs.append(MemoryConfig(mb, freeze_rate=rate, checkpoint_segments=segments, precision=precision))
    return configs


def default_micro_batch_sizes(effective_batch: int) -> list[int]:
    """Powers of two below the effective batch, and the effective batch itself."""
    sizes = {effective_batch}
    size = 1
    while size < effective_batch:
        sizes.add(size)
        size *= 2
    return sorted(sizes, reverse=True)


def default_freeze_rates(n_blocks: int) -> list[float]:
    """0, 1/4, 1/2, 3/4, keeping only rates that freeze a distinct number of blocks."""
    from .knobs import n_frozen_blocks

    rates, seen = [], set()
    for rate in (0.0, 0.25, 0.5, 0.75):
        frozen = n_frozen_blocks(rate, n_blocks)
        if frozen not in seen and frozen < n_blocks:
            seen.add(frozen)
            rates.append(rate)
    return rates


def default_checkpoint_segments(n_blocks: int) -> list[int]:
    """Off, half the blocks, all blocks (the per-freeze-rate cap is applied by `enumerate_configs`)."""
    return sorted({0, max(1, n_blocks // 2), n_blocks})


# ---------------------------------------------------------------------------- pruning rules


def usable_bytes(budget_bytes: float | None, margin: float) -> float | None:
    return None if budget_bytes is None else budget_bytes * (1.0 - margin)


def feasible(candidates: Iterable[Candidate], budget_bytes: float | None, margin: float) -> list[Candidate]:
    """Predicted peak <= budget x (1 - margin). Without a budget or a prediction, a candidate is kept."""
    limit = usable_bytes(budget_bytes, margin)
    return [c for c in candidates if limit is None or c.peak_bytes is None or c.peak_bytes <= limit]


def _speed_key(c: Candidate) -> tuple[float, int, int]:
    """Fastest first: predicted step time when known, then largest micro-batch, then fewest segments."""
    return (c.step_s if c.step_s is not None else 0.0, -c.config.micro_batch_size, c.config.checkpoint_segments)


def dominance_prune(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Keep, per (freeze_rate, precision), only the fastest candidate.

    Micro-batch size and checkpointing change cost, not what is learned (same gradient for the same effective
    batch), so within one trainable set and precision a slower candidate can never gain more per second.
    """
    best: dict[tuple[float, str], Candidate] = {}
    for c in candidates:
        group = (c.config.freeze_rate, c.config.precision)
        if group not in best or _speed_key(c) < _speed_key(best[group]):
            best[group] = c
    return sorted(best.values(), key=_speed_key)


def batchnorm_filter(candidates: Iterable[Candidate], min_micro_batch: int, effective_batch: int | None) -> list[Candidate]:
    """Drop micro-batches below ``min_micro_batch`` for BatchNorm models.

    BatchNorm normalises each micro-batch with its own statistics and updates its running statistics from
    it; with a handful of samples both are noise, so the gradient is no longer the big batch's. A micro-batch
    as large as the whole effective batch is always allowed (that is the run's own batch).
    """
    return [
        c
        for c in candidates
        if c.config.micro_batch_size >= min_micro_batch
        or (effective_batch is not None and c.config.micro_batch_size >= effective_batch)
    ]


def prune(
    candidates: Sequence[Candidate],
    budget_bytes: float | None,
    margin: float,
    *,
    has_batchnorm: bool = False,
    bn_min_micro_batch: int = 8,
    effective_batch: int | None = None,
) -> list[Candidate]:
    """Feasibility, then BatchNorm, then dominance. Raises ValueError when nothing fits, naming the minimum."""
    allowed = batchnorm_filter(candidates, bn_min_micro_batch, effective_batch) if has_batchnorm else list(candidates)
    if not allowed:
        raise ValueError(
            f"No configuration is allowed: the model has BatchNorm and every micro-batch is below "
            f"bn_min_micro_batch={bn_min_micro_batch}; add larger micro_batch_sizes or lower bn_min_micro_batch."
        )
    fitting = feasible(allowed, budget_bytes, margin)
    if not fitting:
        smallest = min(allowed, key=lambda c: c.peak_bytes)  # all predicted, else they would fit
        raise ValueError(
            f"MPOptArguments.memory_budget_mib={budget_bytes / MIB:.1f} (usable {usable_bytes(budget_bytes, margin) / MIB:.1f} "
            f"MiB after safety_margin={margin}) is below the minimum feasible peak {smallest.peak_bytes / MIB:.1f} MiB, "
            f"reached by {smallest.config.short()}; raise memory_budget_mib to at least "
            f"{smallest.peak_bytes / (1 - margin) / MIB:.1f} or widen the search space."
        )
    return dominance_prune(fitting)


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


# ---------------------------------------------------------------------------- the engine


class RuleEngine:
    """Chooses among pruned candidates by measured gain per second; reacts to drift and out-of-memory.

    Driven by its caller: `start` with the metric before training, `observe_step` after each optimizer step
    (it answers whether a trial just ended and a metric is wanted), `observe_metric` with that metric (it
    answers the next configuration), `on_oom` when a step ran out of memory, `task_boundary` at a drift.
    """

    def __init__(
        self,
        candidates: Sequence[Candidate],
        *,
        budget_bytes: float | None = None,
        margin: float = 0.05,
        trial_steps: int = 4,
        trial_max_s: float | None = None,
        search_share: float | None = None,
        strategy: str = "race",
        significance: float = 2.0,
        late_gain: bool = True,
        metric_ceiling: float | None = None,
        exploration: float = 0.5,
        discount: float = 0.25,
        drift_threshold: float | None = None,
        retune_every_steps: int = 0,
        time_budget_s: float | None = None,
        has_batchnorm: bool = False,
        bn_min_micro_batch: int = 8,
        effective_batch: int | None = None,
        on_infeasible: Callable[[MemoryConfig, str], None] | None = None,
        known_infeasible: dict[MemoryConfig, str] | None = None,
    ) -> None:
        if not candidates:
            raise ValueError("RuleEngine needs at least one candidate configuration; the search space is empty.")
        if strategy not in STRATEGIES:
            raise ValueError(f"RuleEngine strategy must be one of {list(STRATEGIES)}, got {strategy!r}.")
        self.strategy, self.significance, self.late_gain = strategy, significance, late_gain
        self.metric_ceiling = metric_ceiling  # the gain metric's best value (1 for accuracy), None: unbounded
        self.candidates = list(candidates)
        self.budget_bytes, self.margin = budget_bytes, margin
        self.trial_steps, self.trial_max_s, self.search_share = trial_steps, trial_max_s, search_share
        self.exploration, self.discount = exploration, discount
        self.drift_threshold, self.retune_every_steps, self.time_budget_s = drift_threshold, retune_every_steps, time_budget_s
        self.has_batchnorm, self.bn_min_micro_batch, self.effective_batch = has_batchnorm, bn_min_micro_batch, effective_batch
        self.on_infeasible = on_infeasible
        # e.g. from the profile store: what ran out of memory in an earlier run on this model and device
        self.infeasible: dict[MemoryConfig, str] = dict(known_infeasible or {})
        self.survivors = self._prune()  # raises ValueError when the budget is below the minimum
        self.arms: dict[MemoryConfig, ArmStats] = {c.config: ArmStats() for c in self.survivors}
        self.queue: list[MemoryConfig] = [c.config for c in self.survivors]
        self.current: MemoryConfig | None = None
        self.baseline: float | None = None
        self.last_metric: float | None = None
        self.trial_seconds = 0.0
        self.trial_steps_done = 0
        self.elapsed_s = 0.0
        self.last_retune_step = 0
        self.last_peak: float | None = None
        self.search_seconds = 0.0  # spent measuring the gain metric (training time is in elapsed_s)
        self.last_eval_s: float | None = None
        # race state: what is left to trial, each trial's gain, the metric and weights it started from
        self.ops: list[str] = []  # for the caller, in order, before the next step: see `take_ops`
        self.race: list[MemoryConfig] = []
        self.racing = False
        self.race_trials: dict[MemoryConfig, RaceTrial] = {}  # in race order
        self.race_start_metric: float | None = None
        self.race_start_search_s = 0.0
        self.race_trial_s: float | None = None
        self.exploit_until_s: float | None = None
        self.discarded_seconds = 0.0  # training time of race trials whose weights were thrown away
        self.race_incumbent: MemoryConfig | None = None
        self.race_streak = 0
        self.race_saved: MemoryConfig | None = None  # whose end state the "best" copy holds
        self.race_mid: tuple[float, float] | None = None  # (metric, trial seconds) half-way through this trial
        self.want_mid = False
        self.last_se: float | None = None
        self.horizon_s: float | None = None  # seconds (training and search) this stretch has, from horizon_from
        self.race_horizon_s: float | None = None  # how far ahead this race's trials are projected
        self.horizon_from = 0.0
        self.decisions: list[Decision] = []

    # -------------------------------------------------------------- queries

    def _prune(self) -> list[Candidate]:
        return prune(
            [c for c in self.candidates if c.config not in self.infeasible],
            self.budget_bytes,
            self.margin,
            has_batchnorm=self.has_batchnorm,
            bn_min_micro_batch=self.bn_min_micro_batch,
            effective_batch=self.effective_batch,
        )

    def candidate(self, config: MemoryConfig) -> Candidate:
        return next((c for c in self.candidates if c.config == config), Candidate(config))

    @property
    def best(self) -> MemoryConfig | None:
        """The configuration with the best estimated gain per second (None before any estimate)."""
        rated = [(c, s.mean) for c, s in self.arms.items() if s.mean is not None]
        return max(rated, key=lambda x: x[1])[0] if rated else None

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
        """From now on, ``seconds`` (training and search) are left (None: unknown). A race that would cost
        more than ``search_share`` of the time left is not run: it could not pay for itself."""
        if seconds is not None and not seconds > 0:
            raise ValueError(f"RuleEngine.set_horizon needs seconds > 0 or None, got {seconds}.")
        self.horizon_s, self.horizon_from = seconds, self.spent_s

    def race_cost_s(self, order: Sequence[MemoryConfig]) -> float:
        """Estimated seconds a race among ``order`` costs beyond training its winner: the trials whose weights
        are thrown away, and the gain-metric evaluations (one at the end of each trial, one more half-way with
        ``late_gain``). A trial lasts as long as the last race's did; before any race, ``trial_steps`` steps of
        the slowest candidate (when its step time is predicted) and at least `min_trial_seconds`."""
        evals = len(order) * (2 if self.late_gain else 1) * (self.last_eval_s or 0.0)
        return (len(order) - 1) * self.race_trial_s_estimate(order) + evals

    def race_trial_s_estimate(self, order: Sequence[MemoryConfig]) -> float:
        """Training seconds one trial of a race among ``order`` is expected to last."""
        if self.race_trial_s is not None:
            return self.race_trial_s
        slowest = max((self.candidate(c).step_s or 0.0 for c in order), default=0.0)
        trial = max(self.trial_steps * slowest, self.min_trial_seconds)
        return trial if self.trial_max_s is None else min(trial, self.trial_max_s)

    def _race_pays(self, order: Sequence[MemoryConfig]) -> tuple[bool, str]:
        """Whether a race fits in ``search_share`` of the time left (always, when that time is unknown)."""
        left = self.time_left_s
        if left is None or len(order) < 2:
            return True, ""
        share = self.search_share or DEFAULT_SEARCH_SHARE
        cost = self.race_cost_s(order)
        return cost <= share * left, f"a race would cost ~{cost:.2f} s, over {share:g} of the {max(left, 0.0):.1f} s left"

    def _projection_horizon(self, order: Sequence[MemoryConfig]) -> float | None:
        """How long the race's winner will train before anything is decided again: the time left after the
        race when it is known, else the exploitation the race's cost buys. None when trials are not projected
        (``late_gain`` off, so no half-way metric)."""
        if not self.late_gain:
            return None
        cost, left = self.race_cost_s(order), self.time_left_s
        if left is not None:
            return max(left - cost - self.race_trial_s_estimate(order), 0.0)
        share = self.search_share or DEFAULT_SEARCH_SHARE
        return cost * (1 - share) / share * 2 ** min(self.race_streak, 3)

    def _no_race_choice(self) -> MemoryConfig:
        """Without a race: the last race's winner while it is still feasible, else the least frozen candidate
        (the fastest of those), because freezing caps what training can reach."""
        alive = [c.config for c in self.survivors]
        if self.race_incumbent in alive:
            return self.race_incumbent
        return min(alive, key=lambda c: c.freeze_rate)  # survivors are fastest first: ties keep the fastest

    # -------------------------------------------------------------- inputs

    def start(self, step: int, metric: float | None, se: float | None = None) -> MemoryConfig:
        """The first configuration to run; ``metric`` is the gain metric before any training (``se``: its
        standard error over the evaluation items, when known)."""
        self.baseline = self.last_metric = metric
        self.last_se = se
        if self.strategy == "race":
            return self._begin_race(step, "start")
        return self._choose(step, "start")

    def observe_step(self, step: int, step_s: float, peak_bytes: float | None = None) -> bool:
        """Count one optimizer step of the current trial; True when the trial is over and a metric is wanted."""
        self.elapsed_s += step_s
        self.trial_seconds += step_s
        self.trial_steps_done += 1
        self.last_peak = peak_bytes
        limit = usable_bytes(self.budget_bytes, self.margin)
        if peak_bytes is not None and limit is not None and peak_bytes > limit and self.current is not None:
            self._mark(self.current, f"measured peak {peak_bytes / MIB:.1f} MiB > usable budget {limit / MIB:.1f} MiB")
            self._restart_trial()
            if self.strategy == "race":
                self._race_after_infeasible(step, self.current, "over budget")
            else:
                self._choose(step, "over budget", prefer_group_of=self.current)
            return False
        if self.retune_every_steps and step - self.last_retune_step >= self.retune_every_steps:
            self.last_retune_step = step
            self._reopen()
            if self.strategy == "race" and not self.racing:
                return True  # the metric that starts the re-opened race
        if self.strategy == "race" and not self.racing:
            if self.exploit_until_s is None or self.elapsed_s < self.exploit_until_s:
                return False
            pays, why = self._race_pays(self._race_order())
            if not pays:  # exploit to the end of the horizon; no evaluation is spent on a race not run
                self.exploit_until_s = None
                self._decide(step, self.current, f"exploitation over: no new race ({why})")
                return False
            return True
        if self._trial_over(1.0):
            return True
        if self.racing and self.late_gain and self.race_mid is None and self._trial_over(0.5):
            self.want_mid = True  # half-way: the metric here starts the second half the trial is judged on
            return True
        return False

    def _trial_over(self, part: float) -> bool:
        """Whether ``part`` of the trial has run: every trial of a race lasts as long as its first; the first
        lasts trial_steps steps and min_trial_seconds, or trial_max_s."""
        if self.trial_max_s is not None and self.trial_seconds >= part * self.trial_max_s:
            return True
        if self.racing and self.race_trial_s is not None:
            return self.trial_seconds >= part * self.race_trial_s
        return (self.trial_steps_done >= math.ceil(part * self.trial_steps)
                and self.trial_seconds >= part * self.min_trial_seconds)

    @property
    def min_trial_seconds(self) -> float:
        """Training seconds a trial needs so that measuring its gain costs at most ``search_share`` of the time.

        A trial is over after ``trial_steps`` steps *and* this long (``trial_max_s``, when set, still ends it):
        on a fast step, a few steps are shorter than one evaluation of the gain metric, and the search would
        cost more time than it trains.
        """
        if not self.search_share or not self.last_eval_s:
            return 0.0
        return self.last_eval_s * (1.0 - self.search_share) / self.search_share

    def add_search_time(self, seconds: float) -> None:
        """The caller spent ``seconds`` measuring the gain metric (it sets how long the next trials last)."""
        self.search_seconds += seconds
        self.last_eval_s = seconds

    def observe_metric(self, step: int, metric: float, proxy: bool = False, se: float | None = None) -> MemoryConfig:
        """The metric (higher is better) at the end of a trial, and its standard error over the evaluation items
        when known; returns the configuration for the next one."""
        previous = self.last_metric
        self.last_metric, self.last_se = metric, se
        if proxy and self.drift_threshold is not None and previous is not None:
            jump = abs(metric - previous) / max(abs(previous), 1e-12)
            if jump > self.drift_threshold:
                self._reopen()
                self.baseline = metric
                self._restart_trial()
                if self.strategy == "race":
                    self._abandon_race()
                    return self._begin_race(step, f"drift: proxy jumped by {jump:.0%}")
                return self._choose(step, f"drift: proxy jumped by {jump:.0%}")
        if self.strategy == "race":
            return self._race_metric(step, metric)
        if self.baseline is not None and self.current is not None and self.trial_seconds > 0:
            self.arms[self.current].add((metric - self.baseline) / self.trial_seconds)
        self.baseline = metric
        self._restart_trial()
        return self._choose(step, "trial")

    def task_boundary(self, step: int, horizon_s: float | None = None) -> MemoryConfig:
        """The data changed: discount what was learned, trial every survivor again (when the new task's
        ``horizon_s`` seconds, if known, pay for a race), re-measure the baseline."""
        self.set_horizon(horizon_s)
        self._reopen()
        self.baseline = None  # the caller's next `observe_metric` sets it on the new data
        self._restart_trial()
        if self.strategy == "race":
            self._abandon_race()
            self.race_streak = 0
            return self._begin_race(step, "task boundary")
        return self._choose(step, "task boundary")

    def set_baseline(self, metric: float, se: float | None = None) -> None:
        self.baseline = self.last_metric = metric
        self.last_se = se
        if self.racing and self.race_start_metric is None:
            self.race_start_metric = metric  # a race opened at a task boundary starts from the new data's metric

    def take_ops(self) -> list[str]:
        """What the caller must do to the weights (with optimizer and scheduler state) before the next step:

        * ``snapshot``: copy them as the race's start;
        * ``save_best``: copy them as the best race trial's end state so far;
        * ``restore_start``: load the race's start (the next trial starts where the others did);
        * ``restore_best``: load the best trial's end state (the winner, when it was not the last trial);
        * ``drop``: forget both copies (the race is over).
        """
        ops, self.ops = self.ops, []
        return ops

    def on_oom(self, step: int, config: MemoryConfig) -> MemoryConfig:
        """``config`` ran out of memory: it and every configuration predicted at least as large are infeasible."""
        failed = self.candidate(config)
        self._mark(config, "out of memory")
        for c in self.candidates:
            if c.config in self.infeasible:
                continue
            if failed.peak_bytes is not None and c.peak_bytes is not None:
                larger = c.peak_bytes >= failed.peak_bytes
            else:  # no prediction: same knobs but a larger micro-batch, or fewer segments too, is larger
                same = (c.config.freeze_rate, c.config.precision) == (config.freeze_rate, config.precision)
                larger = same and c.config.micro_batch_size >= config.micro_batch_size and (
                    c.config.checkpoint_segments <= config.checkpoint_segments
                )
            if larger:
                self._mark(c.config, f"predicted larger than {config.short()}, which ran out of memory")
        self._restart_trial()
        if self.strategy == "race":
            return self._race_after_infeasible(step, config, f"out of memory with {config.short()}")
        return self._choose(step, f"out of memory with {config.short()}", prefer_group_of=config)

    # -------------------------------------------------------------- internals

    def _mark(self, config: MemoryConfig, reason: str) -> None:
        if config in self.infeasible:
            return
        self.infeasible[config] = reason
        if self.on_infeasible is not None:
            self.on_infeasible(config, reason)

    def _restart_trial(self) -> None:
        self.trial_seconds = 0.0
        self.trial_steps_done = 0
        self.race_mid, self.want_mid = None, False

    def _reopen(self) -> None:
        for stats in self.arms.values():
            stats.discount(self.discount)
        self.queue = [c.config for c in self.survivors]

    def _choose(self, step: int, reason: str, prefer_group_of: MemoryConfig | None = None) -> MemoryConfig:
        """The UCB strategy's next trial; after a configuration was marked infeasible, its group's next fastest."""
        if prefer_group_of is not None:  # survivors changed: re-prune and keep the arms that remain
            known = set(self.arms)
            self.survivors = self._survivors_after_marks(reason)
            self.queue = [c for c in self.queue if c in self.arms] + [c for c in self.arms if c not in known]
            group = (prefer_group_of.freeze_rate, prefer_group_of.precision)
            same = [c.config for c in self.survivors if (c.config.freeze_rate, c.config.precision) == group]
            choice = same[0] if same else (self.best or self.survivors[0].config)
            if choice in self.queue:
                self.queue.remove(choice)
            return self._decide(step, choice, reason)
        if self.queue:
            return self._decide(step, self.queue.pop(0), f"{reason}: measure each candidate")
        choice, is_best = ucb_choice(list(self.arms.items()), self.exploration)
        return self._decide(step, choice, f"{reason}: {'exploit best' if is_best else 're-measure challenger'}")

    # -------------------------------------------------------------- the race

    def _race_order(self) -> list[MemoryConfig]:
        """Slowest first, so that the first trial (which sets every trial's length) covers trial_steps of each."""
        def slow_key(c: Candidate) -> tuple[float, float, int, int]:
            known = c.step_s if c.step_s is not None else 0.0
            return (-known, c.config.freeze_rate, c.config.micro_batch_size, -c.config.checkpoint_segments)

        return [c.config for c in sorted(self.survivors, key=slow_key)]

    def _begin_race(self, step: int, reason: str) -> MemoryConfig:
        order = self._race_order()
        if len(order) == 1:  # nothing to compare: run it until something changes
            self.racing, self.exploit_until_s = False, None
            return self._decide(step, order[0], f"{reason}: the only feasible candidate")
        pays, why = self._race_pays(order)
        if not pays:  # run until something changes (a task boundary, an out-of-memory error, drift)
            self.racing, self.exploit_until_s = False, None
            choice = self._no_race_choice()
            kind = "the last race's winner" if choice == self.race_incumbent else "the least frozen, fastest candidate"
            return self._decide(step, choice, f"{reason}: no race ({why}): {kind}")
        self.racing, self.race = True, order[1:]
        self.race_trials = {}
        self.race_horizon_s = self._projection_horizon(order)
        self.race_saved = None
        self.race_start_metric, self.race_trial_s = self.baseline, None
        self.race_start_search_s = self.search_seconds
        self.ops.append("snapshot")
        return self._decide(step, order[0], f"{reason}: race 1/{len(order)} from the same weights")

    def stop_race(self, step: int) -> MemoryConfig:
        """Training stopped in the middle of a race: keep the best trial that ended (``restore_best`` in
        `take_ops`; with none ended, the weights stay as they are), drop the race, and exploit that
        configuration; the next step end asks for the metric that begins a new race."""
        if not self.racing:
            return self.current
        keep = self.race_saved
        self.ops = [op for op in self.ops if op == "save_best"] + (["restore_best"] if keep is not None else []) + ["drop"]
        self.racing, self.race = False, []
        self.exploit_until_s = self.elapsed_s
        choice = keep if keep is not None else self.current
        if keep is not None:
            self.baseline = self.last_metric = self.race_trials[keep].metric
        self._restart_trial()
        return self._decide(step, choice, "training stopped mid-race: keep the best trial that ended")

    def _abandon_race(self) -> None:
        if self.racing:
            self.ops.append("drop")
        self.racing, self.race = False, []

    def _race_metric(self, step: int, metric: float) -> MemoryConfig:
        if not self.racing:  # the exploitation is over: its gain is one more estimate, then race again
            if self.baseline is not None and self.current is not None and self.trial_seconds > 0:
                self.arms[self.current].add((metric - self.baseline) / self.trial_seconds)
            self.baseline = self.last_metric = metric
            self._restart_trial()
            self._reopen()
            return self._begin_race(step, "exploitation over")
        if self.want_mid:
            self.want_mid, self.race_mid = False, (metric, self.trial_seconds)
            return self.current  # the trial goes on
        start = self.race_start_metric if self.race_start_metric is not None else metric
        projected = None
        if self.race_mid is not None and self.trial_seconds > self.race_mid[1]:
            # the second half's rate: a fast start that flattens out, or the dip of parameters unfrozen with
            # fresh optimizer state, is not what the next minutes of training will see
            gain = (metric - self.race_mid[0]) / (self.trial_seconds - self.race_mid[1])
            if self.race_horizon_s is not None:
                projected = project_metric(start, self.race_mid[0], self.race_mid[1], metric, self.trial_seconds,
                                           self.race_horizon_s, self.metric_ceiling, self.last_se or 0.0)
        else:
            gain = (metric - start) / max(self.trial_seconds, 1e-12)
        self._record_trial(self.current, gain, metric, projected)
        if self.race:
            self.ops.append("restore_start")
            following = self.race.pop(0)
            n = len(self.race_trials) + len(self.race) + 1
            self._restart_trial()
            return self._decide(step, following, f"trial: race {len(self.race_trials) + 1}/{n} from the same weights")
        return self._finish_race(step)

    def _record_trial(self, config: MemoryConfig, gain: float, metric: float, projected: float | None = None) -> None:
        self.race_trials[config] = RaceTrial(gain, metric, self.trial_seconds, self.last_se, projected)
        if self.race_trial_s is None:
            self.race_trial_s = self.trial_seconds
        self.arms[config].add(gain)
        if self.race_winner()[0] == config:  # the winner so far: keep its end state
            self.ops.append("save_best")
            self.race_saved = config

    def race_winner(self) -> tuple[MemoryConfig, bool]:
        """The best metric projected to the race's horizon (`project_metric`), or without projections (no
        half-way metric) the best gain per second; (winner, whether it won a tie).

        Gains are compared over the race's trial length: a lead smaller than ``significance`` standard errors
        of the metric is a tie, and a tie goes to the least frozen candidate (then the earliest in the race).
        Short trials favour configurations that gain fast but stop early (a frozen body reaches a lower
        ceiling, and a trial that unfreezes parameters pays for their fresh optimizer state at once), so
        training fewer parameters has to win clearly.
        """
        trials = self.race_trials
        if all(t.projected is not None for t in trials.values()):  # the metric each would reach by the horizon
            score = {c: t.projected for c, t in trials.items()}
        else:
            length = self.race_trial_s or 1.0
            score = {c: t.gain * length for c, t in trials.items()}
        leader = max(score, key=lambda c: score[c])
        tolerance = self.significance * (trials[leader].se or 0.0)
        tied = [c for c in score if score[c] >= score[leader] - tolerance]  # in race order
        winner = min(tied, key=lambda c: c.freeze_rate)
        return winner, winner != leader

    def _finish_race(self, step: int) -> MemoryConfig:
        winner, by_tie = self.race_winner()
        if winner not in (self.current, self.race_saved):  # its end state is gone (ties judged on another error)
            winner, by_tie = self.race_saved, False
        if winner != self.current:
            self.ops.append("restore_best")
        self.ops.append("drop")
        discarded = sum(t.seconds for c, t in self.race_trials.items() if c != winner)
        self.discarded_seconds += discarded
        cost = discarded + self.search_seconds - self.race_start_search_s
        # exploit until the race's cost is at most search_share of the time since the race began; each
        # race that confirms the incumbent doubles that (up to 8x): a settled choice is re-checked less often
        share = self.search_share or DEFAULT_SEARCH_SHARE
        self.race_streak = self.race_streak + 1 if winner == self.race_incumbent else 0
        self.race_incumbent = winner
        kept = self.race_trials[winner].seconds
        self.exploit_until_s = self.elapsed_s + max(cost * (1 - share) / share * 2 ** min(self.race_streak, 3) - kept, 0.0)
        self.racing = False
        self.baseline = self.last_metric = self.race_trials[winner].metric
        self._restart_trial()
        tie = f", the least frozen within {self.significance:g} standard errors of the best" if by_tie else ""
        won = self.race_trials[winner]
        ahead = (f"{won.projected:.4g} projected {self.race_horizon_s:.1f} s ahead, " if won.projected is not None
                 and self.race_horizon_s is not None else "")
        return self._decide(step, winner, f"race won ({ahead}{won.gain:.4g}/s over {len(self.race_trials)}{tie}): "
                                          f"exploit for {self.exploit_until_s - self.elapsed_s:.1f} s")

    def _race_after_infeasible(self, step: int, config: MemoryConfig, reason: str) -> MemoryConfig:
        """``config`` (the current trial's) cannot run: the race goes on without it, from its start again."""
        self.survivors = self._survivors_after_marks(reason)
        alive = {c.config for c in self.survivors}
        self.race = [c for c in self.race if c in alive]
        if not self.racing:
            return self._begin_race(step, reason)
        self.ops.append("restore_start")  # the failed trial's partial steps are undone
        if self.race:
            return self._decide(step, self.race.pop(0), f"{reason}: next in the race")
        if self.race_trials:
            return self._finish_race(step)
        return self._begin_race(step, reason)

    def _survivors_after_marks(self, reason: str) -> list[Candidate]:
        try:
            survivors = self._prune()
        except ValueError as exc:
            raise RuntimeError(
                f"No feasible configuration is left after {reason} ({len(self.infeasible)} marked infeasible): {exc}"
            ) from exc
        self.arms = {c.config: self.arms.get(c.config) or ArmStats() for c in survivors}
        return survivors

    def _decide(self, step: int, choice: MemoryConfig, why: str) -> MemoryConfig:
        self.current = choice
        cand = self.candidate(choice)
        self.decisions.append(
            Decision(
                step=step,
                elapsed_s=round(self.elapsed_s, 9),
                config=choice.to_dict(),
                predicted_peak_bytes=cand.peak_bytes,
                measured_peak_bytes=self.last_peak,
                gain_estimate=self.arms[choice].mean,
                reason=why,
            )
        )
        return choice

    # -------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "candidates": [c.to_dict() for c in self.candidates],
            "infeasible": [[c.to_dict(), r] for c, r in self.infeasible.items()],
            "arms": [[c.to_dict(), asdict(s)] for c, s in self.arms.items()],
            "queue": [c.to_dict() for c in self.queue],
            "current": None if self.current is None else self.current.to_dict(),
            "baseline": self.baseline,
            "last_metric": self.last_metric,
            "trial_seconds": self.trial_seconds,
            "trial_steps_done": self.trial_steps_done,
            "elapsed_s": self.elapsed_s,
            "last_retune_step": self.last_retune_step,
            "last_peak": self.last_peak,
            "search_seconds": self.search_seconds,
            "last_eval_s": self.last_eval_s,
            "race": {
                "ops": list(self.ops), "queue": [c.to_dict() for c in self.race], "racing": self.racing,
                "trials": [[c.to_dict(), asdict(t)] for c, t in self.race_trials.items()],
                "last_se": self.last_se,
                "saved": None if self.race_saved is None else self.race_saved.to_dict(),
                "mid": None if self.race_mid is None else list(self.race_mid), "want_mid": self.want_mid,
                "start_metric": self.race_start_metric, "start_search_s": self.race_start_search_s,
                "trial_s": self.race_trial_s, "exploit_until_s": self.exploit_until_s,
                "discarded_seconds": self.discarded_seconds,
                "incumbent": None if self.race_incumbent is None else self.race_incumbent.to_dict(),
                "streak": self.race_streak,
                "horizon_s": self.race_horizon_s,
            },
            "horizon": {"seconds": self.horizon_s, "from": self.horizon_from},
            "decisions": [d.to_dict() for d in self.decisions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.candidates = [Candidate.from_dict(c) for c in state["candidates"]]
        self.infeasible = {MemoryConfig.from_dict(c): r for c, r in state["infeasible"]}
        self.survivors = self._prune()
        self.arms = {MemoryConfig.from_dict(c): ArmStats(**s) for c, s in state["arms"]}
        self.queue = [MemoryConfig.from_dict(c) for c in state["queue"]]
        self.current = None if state["current"] is None else MemoryConfig.from_dict(state["current"])
        for name in ("baseline", "last_metric", "trial_seconds", "trial_steps_done", "elapsed_s", "last_retune_step", "last_peak"):
            setattr(self, name, state[name])
        self.search_seconds, self.last_eval_s = state.get("search_seconds", 0.0), state.get("last_eval_s")
        race = state.get("race")
        if race is not None:
            self.ops, self.racing = list(race["ops"]), race["racing"]
            self.race = [MemoryConfig.from_dict(c) for c in race["queue"]]
            self.race_trials = {MemoryConfig.from_dict(c): RaceTrial(**t) for c, t in race["trials"]}
            self.last_se = race["last_se"]
            self.race_saved = None if race["saved"] is None else MemoryConfig.from_dict(race["saved"])
            self.race_mid = None if race["mid"] is None else (race["mid"][0], race["mid"][1])
            self.want_mid = race["want_mid"]
            self.race_start_metric, self.race_start_search_s = race["start_metric"], race["start_search_s"]
            self.race_trial_s, self.exploit_until_s = race["trial_s"], race["exploit_until_s"]
            self.discarded_seconds = race["discarded_seconds"]
            self.race_incumbent = None if race["incumbent"] is None else MemoryConfig.from_dict(race["incumbent"])
            self.race_streak = race["streak"]
            self.race_horizon_s = race.get("horizon_s")
        horizon = state.get("horizon") or {}
        self.horizon_s, self.horizon_from = horizon.get("seconds"), horizon.get("from", 0.0)
        self.decisions = [Decision(**d) for d in state["decisions"]]
