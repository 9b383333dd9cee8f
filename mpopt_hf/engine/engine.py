"""The rule engine's shell: the candidates and their survivors, the per-configuration estimates, the counts of
the current trial and the decisions; the rules (`rules`), the scoring (`scoring`), the time (`clock`) and how the
survivors are compared (`strategies`) live in their own modules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ..config import GAIN_UNITS, STRATEGIES, MemoryConfig
from .candidates import Candidate, Choice, Decision, DecisionKind, RaceTrial
from .clock import SearchClock
from .forwarding import forwarded
from .inputs import EngineInputs
from .persistence import engine_state_dict, load_engine_state
from .rules import batchnorm_filter, group_key, prune, usable_bytes
from .scoring import ArmStats, payback_seconds
from .step_times import StepTimeLearner
from .strategies import STRATEGY_TYPES, Race, RaceState
from .trial import TrialCounts


class RuleEngine(EngineInputs):
    """Chooses among pruned candidates by measured gain per second; reacts to drift and out-of-memory.

    Driven by its caller through `step`: an event in (`events.Start`, `StepDone`, `Metric`, `OutOfMemory`,
    `TaskBoundary`, `BudgetChanged`, ...), the actions to carry out back (`Run`, `Evaluate`, `Snapshot`,
    `Restore`, `Drop`, `Stop`). The inputs behind it (`start`, `observe_step`, `observe_metric`, `on_oom`,
    `task_boundary`, `set_budget`, in `inputs`) stay callable one at a time.

    ``copy_bytes``: bytes of one host copy of the training state (weights, optimizer state) that count against
    the budget (on a CPU the host is the device); a race holds two while it runs, the start and the best trial's
    end. ``metric_ceiling``: the gain metric's best value (1 for accuracy; None: unbounded).
    """

    # the clock's and the race's state, under the names they have always had on the engine
    time_budget_s = forwarded[float | None]("clock")
    elapsed_s = forwarded[float]("clock")
    search_seconds = forwarded[float]("clock")
    last_eval_s = forwarded[float | None]("clock")
    horizon_s = forwarded[float | None]("clock")
    horizon_from = forwarded[float]("clock")
    baseline = forwarded[float | None]("counts")
    last_metric = forwarded[float | None]("counts")
    last_se = forwarded[float | None]("counts")
    trial_seconds = forwarded[float]("counts")
    trial_steps_done = forwarded[int]("counts")
    last_retune_step = forwarded[int]("counts")
    last_peak = forwarded[float | None]("counts")
    ops = forwarded[list[str]]("race_state")
    racing = forwarded[bool]("race_state")
    race_trials = forwarded[dict[MemoryConfig, RaceTrial]]("race_state", "trials")
    race_incumbent = forwarded[MemoryConfig | None]("race_state", "incumbent")
    discarded_seconds = forwarded[float]("race_state")

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
        gain_per: str = "second",
        significance: float = 2.0,
        late_gain: bool = True,
        metric_ceiling: float | None = None,
        copy_bytes: float = 0.0,
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
        if gain_per not in GAIN_UNITS:
            raise ValueError(f"RuleEngine gain_per must be one of {list(GAIN_UNITS)}, got {gain_per!r}.")
        self.strategy, self.significance, self.late_gain = strategy, significance, late_gain
        self.gain_per = gain_per  # a trial's gain is per training second, or per Trainer step (fixed epochs)
        self.steps_left: int | None = None  # Trainer steps left to the run (every event's), if known
        self.metric_ceiling = metric_ceiling  # the gain metric's best value (1 for accuracy), None: unbounded
        self.candidates = list(candidates)
        self.budget_bytes, self.margin = budget_bytes, margin
        self.trial_steps, self.trial_max_s, self.search_share = trial_steps, trial_max_s, search_share
        self.exploration, self.discount = exploration, discount
        self.drift_threshold, self.retune_every_steps = drift_threshold, retune_every_steps
        self.clock = SearchClock(time_budget_s)
        self.has_batchnorm, self.bn_min_micro_batch, self.effective_batch = has_batchnorm, bn_min_micro_batch, effective_batch
        self.on_infeasible = on_infeasible
        self.copy_bytes = copy_bytes
        # e.g. from the profile store: what ran out of memory in an earlier run on this model and device
        self.infeasible: dict[MemoryConfig, str] = dict(known_infeasible or {})
        # the budget under which each mark was made (None: unknown, e.g. the store's): a larger budget lifts it
        self.marked_under: dict[MemoryConfig, float | None] = {c: None for c in self.infeasible}
        self.cause = DecisionKind.START  # the event being answered: each decision's kind
        self.below_minimum = False  # the budget left no candidate: the smallest runs until it grows
        self.step_times = StepTimeLearner({c.config: c.step_s for c in self.candidates})
        self.current: MemoryConfig | None = None
        self.counts = TrialCounts()
        self.survivors = self._prune()  # raises ValueError when the budget is below the minimum
        self.arms: dict[MemoryConfig, ArmStats] = {c.config: ArmStats() for c in self.survivors}
        self.queue: list[MemoryConfig] = [c.config for c in self.survivors]  # survivors due a trial (ucb)
        self.policy = STRATEGY_TYPES[strategy](self)
        # the race's state and queries (`race_cost_s`, `stop_race`) answer under every strategy
        self._race = self.policy if isinstance(self.policy, Race) else Race(self)
        self.decisions: list[Decision] = []

    # -------------------------------------------------------------- queries

    def _prune(self) -> list[Candidate]:
        """The survivors under the current budget. Before training, a budget below every candidate is the user's
        error (raised, naming the minimum); once training runs (the budget fell), the smallest candidate runs."""
        candidates = [self.candidate(c.config) for c in self.candidates]
        self.below_minimum = False
        try:
            return prune(candidates, self.budget_bytes, self.margin, **self._rule_context())
        except ValueError:
            allowed = [c for c in candidates if c.config not in self.infeasible]
            if self.current is None or not allowed:
                raise
        if self.has_batchnorm:
            allowed = batchnorm_filter(allowed, self.bn_min_micro_batch, self.effective_batch) or allowed
        smallest = min(allowed, key=lambda c: c.peak_bytes or 0.0)
        self.below_minimum = True
        return [smallest]

    def _rule_context(self) -> dict[str, Any]:
        return dict(has_batchnorm=self.has_batchnorm, bn_min_micro_batch=self.bn_min_micro_batch,
                    effective_batch=self.effective_batch, infeasible=self.infeasible)

    def candidate(self, config: MemoryConfig) -> Candidate:
        """``config`` with its predicted peak and its step seconds as learned so far (`StepTimeLearner`)."""
        found = next((c for c in self.candidates if c.config == config), Candidate(config))
        return replace(found, step_s=self.step_times.corrected(config)) if found.step_s is not None else found

    @property
    def race_state(self) -> RaceState:
        """What the race has done and has left (saved under every strategy); changed only by the race."""
        return self._race.state

    @property
    def awaits_race_start(self) -> bool:
        """A race runs whose start has no gain metric yet (it opened at a task boundary): the next is its start."""
        return self.racing and self.race_state.start_metric is None

    @property
    def best(self) -> MemoryConfig | None:
        """The configuration with the best estimated gain per second (None before any estimate)."""
        rated = [(c, s.mean) for c, s in self.arms.items() if s.mean is not None]
        return max(rated, key=lambda x: x[1])[0] if rated else None

    @property
    def measures(self) -> bool:
        """Whether the strategy compares configurations by the gain metric (``fixed`` and ``halving`` do not)."""
        return self.policy.measures

    @property
    def out_of_time(self) -> bool:
        return self.clock.out_of_time

    @property
    def spent_s(self) -> float:
        """Training seconds (race trials included) plus the seconds spent measuring the gain metric."""
        return self.clock.spent_s

    @property
    def time_left_s(self) -> float | None:
        """Seconds left to this stretch of training: the horizon's and ``time_budget_s``'s, whichever is shorter."""
        return self.clock.time_left_s

    def set_horizon(self, seconds: float | None) -> None:
        """From now on, ``seconds`` (training and search) are left (None: unknown). A race that would cost
        more than ``search_share`` of the time left is not run: it could not pay for itself."""
        self.clock.set_horizon(seconds)

    def race_cost_s(self, order: Sequence[MemoryConfig]) -> float:
        """Estimated seconds a race among ``order`` costs beyond training its winner: the trials whose weights
        are thrown away, and the gain-metric evaluations (one at the end of each trial, one more half-way with
        ``late_gain``). A trial lasts as long as the last race's did; before any race, ``trial_steps`` steps of
        the slowest candidate (when its step time is predicted) and at least `min_trial_seconds`."""
        return self._race.cost_s(order)

    def race_trial_s_estimate(self, order: Sequence[MemoryConfig]) -> float:
        """Training seconds one trial of a race among ``order`` is expected to last."""
        return self._race.trial_s_estimate(order)

    def race_winner(self) -> tuple[MemoryConfig, bool]:
        """The best metric projected to the race's horizon, or without projections the best gain per second;
        (winner, whether it won a tie within ``significance`` standard errors): see `scoring.judge_race`."""
        return self._race.winner()

    @property
    def min_trial_seconds(self) -> float:
        """Training seconds a trial needs so that measuring its gain costs at most ``search_share`` of the time.

        A trial is over after ``trial_steps`` steps *and* this long (``trial_max_s``, when set, still ends it):
        on a fast step, a few steps are shorter than one evaluation of the gain metric, and the search would
        cost more time than it trains.
        """
        if not self.search_share or not self.last_eval_s:
            return 0.0
        return payback_seconds(self.last_eval_s, self.search_share)

    @property
    def trial_progress(self) -> float:
        """How far the current trial has gone, in the unit its gain is divided by (``gain_per``)."""
        return float(self.trial_steps_done) if self.gain_per == "step" else self.trial_seconds

    def trial_over(self, part: float) -> bool:
        """Whether ``part`` of the trial has run: every trial of a race lasts as long as its first (in seconds,
        or in steps when ``gain_per`` is 'step'); the first lasts trial_steps steps and min_trial_seconds, or
        trial_max_s."""
        if self.trial_max_s is not None and self.trial_seconds >= part * self.trial_max_s:
            return True
        if self.racing and self.gain_per == "step" and self.race_state.trial_steps is not None:
            return self.trial_steps_done >= math.ceil(part * self.race_state.trial_steps)
        if self.racing and self.race_state.trial_s is not None:
            return self.trial_seconds >= part * self.race_state.trial_s
        return (self.trial_steps_done >= math.ceil(part * self.trial_steps)
                and self.trial_seconds >= part * self.min_trial_seconds)

    # -------------------------------------------------------------- for the strategies

    def _mark(self, config: MemoryConfig, reason: str) -> None:
        if config in self.infeasible:
            return
        self.infeasible[config] = reason
        self.marked_under[config] = self.budget_bytes
        if self.on_infeasible is not None:
            self.on_infeasible(config, reason)

    def restart_trial(self) -> None:
        """A new trial begins: its counts, and its half-way metric, start again."""
        self.trial_seconds = 0.0
        self.trial_steps_done = 0
        self._race.new_trial()

    def credit(self, config: MemoryConfig, gain: float) -> None:
        """One more measured gain (per second, or per step) of ``config``."""
        self.arms.setdefault(config, ArmStats()).add(gain)

    def credit_trial(self, metric: float) -> None:
        """The trial that just ended (on the running weights) adds its gain per second to its configuration's
        estimate; ``metric`` is the next trial's baseline."""
        if self.baseline is not None and self.current is not None and self.trial_progress > 0:
            self.credit(self.current, (metric - self.baseline) / self.trial_progress)
        self.go_on_from(metric)
        self.restart_trial()

    def go_on_from(self, metric: float | None) -> None:
        """Training goes on from weights whose gain metric is ``metric`` (None: not measured): the next trial is
        measured against it."""
        self.baseline = self.last_metric = metric

    def reopen(self) -> None:
        """Search again: older estimates are discounted, the candidates are pruned again on the step times learned
        so far, and every survivor is due a trial."""
        self.reprune("re-pricing on measured step times")
        for stats in self.arms.values():
            stats.discount(self.discount)
        self.queue = [c.config for c in self.survivors]

    def next_due(self) -> MemoryConfig | None:
        """The next survivor due a trial (ucb measures each once), taken off the list; None when none is."""
        return self.queue.pop(0) if self.queue else None

    def take_due(self, config: MemoryConfig) -> MemoryConfig:
        """``config`` runs now: it is no longer due a trial."""
        if config in self.queue:
            self.queue.remove(config)
        return config

    def roomy_survivors(self, copies: int = 2) -> list[Candidate]:
        """The survivors of the candidates under the budget less ``copies`` host copies: what a race can compare
        when the fastest of each trainable set leaves no room for its copies (e.g. a smaller micro-batch of it)."""
        usable = usable_bytes(self.budget_bytes, self.margin)
        if usable is None or not self.copy_bytes:
            return list(self.survivors)
        reduced = (usable - copies * self.copy_bytes) / (1.0 - self.margin)
        if reduced <= 0:
            return []
        try:
            return prune([self.candidate(c.config) for c in self.candidates], reduced, self.margin,
                         **self._rule_context())
        except ValueError:
            return []

    def fastest_sibling(self, config: MemoryConfig) -> MemoryConfig:
        """The survivor that learns what ``config`` learns (same trainable set, precision and batch), the fastest
        that fits the whole budget: once a race's copies are dropped, its winner goes on at that speed."""
        key = group_key(config)
        return next((c.config for c in self.survivors if group_key(c.config) == key), config)

    def leave_room_for_copies(self, order: Sequence[MemoryConfig], copies: int = 2) -> list[MemoryConfig]:
        """The configurations of ``order`` whose predicted peak plus ``copies`` host copies fits the budget."""
        usable = usable_bytes(self.budget_bytes, self.margin)
        if usable is None or not self.copy_bytes:
            return list(order)
        extra = copies * self.copy_bytes
        return [c for c in order if (self.candidate(c).peak_bytes or 0.0) + extra <= usable]

    def reprune(self, reason: str) -> list[Candidate]:
        """Prune again after configurations were marked infeasible or the budget changed (``reason``): the arms
        and the survivors due a trial that remain are kept, a new survivor is due one. Returns the survivors."""
        try:
            survivors = self._prune()
        except ValueError as exc:
            raise RuntimeError(
                f"No feasible configuration is left after {reason} ({len(self.infeasible)} marked infeasible): {exc}"
            ) from exc
        alive = [c.config for c in survivors]
        self.queue = [c for c in self.queue if c in alive] + [c for c in alive if c not in self.arms]
        self.arms = {c: self.arms.get(c) or ArmStats() for c in alive}
        self.survivors = survivors
        self._race.keep_only(set(alive))
        return survivors

    def decide(self, step: int, choice: Choice | None) -> MemoryConfig | None:
        """Run ``choice`` next, logged as a `Decision` of the current cause (None: nothing changes). Returns the
        configuration to run."""
        if choice is None:
            return self.current
        if not isinstance(choice, Choice):
            raise TypeError(f"A search strategy must answer an engine.candidates.Choice (or None), got {choice!r}: "
                            f"{type(self.policy).__name__} follows an older protocol (see engine.strategies.base).")
        self.current = config = choice.config
        self.decisions.append(
            Decision(
                step=step,
                elapsed_s=round(self.elapsed_s, 9),
                config=config.to_dict(),
                predicted_peak_bytes=self.candidate(config).peak_bytes,
                measured_peak_bytes=self.last_peak,
                gain_estimate=self.arms[config].mean if config in self.arms else None,
                reason=choice.why,
                kind=DecisionKind(self.cause).value,
                budget_bytes=self.budget_bytes,
                outcome=choice.outcome.value,
            )
        )
        return config

    # -------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        return engine_state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_engine_state(self, state)
