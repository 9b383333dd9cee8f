"""The rule engine: which configuration to run, as plain rules on numbers.

Rules, in order: a configuration must fit the budget (*feasibility*); among those with the same trainable
set and precision only the fastest is worth a trial (*dominance*); BatchNorm models never train on
tiny micro-batches; the survivors are compared by *accuracy gain per second* of training, measured in
short trials and chosen by a discounted UCB bandit (so a stale estimate of the incumbent or a challenger
is corrected); drift re-opens the search with older estimates discounted; an out-of-memory error removes
the configuration and everything predicted larger. Nothing here imports torch or touches a model: the
callback feeds numbers in and applies the configurations that come out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .config import MemoryConfig

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

    # -------------------------------------------------------------- inputs

    def start(self, step: int, metric: float | None) -> MemoryConfig:
        """The first configuration to run; ``metric`` is the gain metric before any training."""
        self.baseline = self.last_metric = metric
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
            self._choose(step, "over budget", prefer_group_of=self.current)
            return False
        if self.retune_every_steps and step - self.last_retune_step >= self.retune_every_steps:
            self.last_retune_step = step
            self._reopen()
        if self.trial_max_s is not None and self.trial_seconds >= self.trial_max_s:
            return True
        return self.trial_steps_done >= self.trial_steps and self.trial_seconds >= self.min_trial_seconds

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

    def observe_metric(self, step: int, metric: float, proxy: bool = False) -> MemoryConfig:
        """The metric (higher is better) at the end of a trial; returns the configuration for the next one."""
        previous = self.last_metric
        self.last_metric = metric
        if proxy and self.drift_threshold is not None and previous is not None:
            jump = abs(metric - previous) / max(abs(previous), 1e-12)
            if jump > self.drift_threshold:
                self._reopen()
                self.baseline = metric
                self._restart_trial()
                return self._choose(step, f"drift: proxy jumped by {jump:.0%}")
        if self.baseline is not None and self.current is not None and self.trial_seconds > 0:
            self.arms[self.current].add((metric - self.baseline) / self.trial_seconds)
        self.baseline = metric
        self._restart_trial()
        return self._choose(step, "trial")

    def task_boundary(self, step: int) -> MemoryConfig:
        """The data changed: discount what was learned, trial every survivor again, re-measure the baseline."""
        self._reopen()
        self.baseline = None  # the caller's next `observe_metric` sets it on the new data
        self._restart_trial()
        return self._choose(step, "task boundary")

    def set_baseline(self, metric: float) -> None:
        self.baseline = self.last_metric = metric

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

    def _reopen(self) -> None:
        for stats in self.arms.values():
            stats.discount(self.discount)
        self.queue = [c.config for c in self.survivors]

    def _choose(self, step: int, reason: str, prefer_group_of: MemoryConfig | None = None) -> MemoryConfig:
        if prefer_group_of is not None:  # survivors changed: re-prune and keep the arms that remain
            try:
                self.survivors = self._prune()
            except ValueError as exc:
                raise RuntimeError(
                    f"No feasible configuration is left after {reason} ({len(self.infeasible)} marked infeasible): {exc}"
                ) from exc
            arms = {}
            for c in self.survivors:
                arms[c.config] = self.arms.get(c.config) or ArmStats()
            fresh = [c for c in arms if c not in self.arms]
            self.arms = arms
            self.queue = [c for c in self.queue if c in arms] + fresh
            group = (prefer_group_of.freeze_rate, prefer_group_of.precision)
            same = [c.config for c in self.survivors if (c.config.freeze_rate, c.config.precision) == group]
            choice = same[0] if same else (self.best or self.survivors[0].config)
            if choice in self.queue:
                self.queue.remove(choice)
            why = reason
        elif self.queue:
            choice, why = self.queue.pop(0), f"{reason}: measure each candidate"
        else:
            choice, is_best = ucb_choice(list(self.arms.items()), self.exploration)
            why = f"{reason}: {'exploit best' if is_best else 're-measure challenger'}"
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
        self.decisions = [Decision(**d) for d in state["decisions"]]
