"""The rule engine's shell: the candidates and their survivors, the per-configuration estimates, the counts of
the current trial and the decisions; the rules (`rules`), the scoring (`scoring`), the time (`clock`) and how the
survivors are compared (`strategies`) live in their own modules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ..config import GAIN_UNITS, STRATEGIES, MemoryConfig
from .candidates import MIB, Candidate, Decision, DecisionKind, RaceTrial
from .clock import SearchClock
from .rules import at_least_as_large, batchnorm_filter, group_key, prune, usable_bytes
from .scoring import ArmStats, payback_seconds, relative_change
from .forwarding import forwarded, mib_text
from .persistence import engine_state_dict, load_engine_state
from .step_times import StepTimeLearner
from .strategies import STRATEGY_TYPES, Race, RaceState

class RuleEngine:
    """Chooses among pruned candidates by measured gain per second; reacts to drift and out-of-memory.

    Driven by its caller: `start` with the metric before training, `observe_step` after each optimizer step
    (it answers whether a trial just ended and a metric is wanted), `observe_metric` with that metric (it
    answers the next configuration), `on_oom` when a step ran out of memory, `task_boundary` at a drift.
    """

    # the clock's and the race's state, under the names they have always had on the engine
    time_budget_s = forwarded[float | None]("clock")
    elapsed_s = forwarded[float]("clock")
    search_seconds = forwarded[float]("clock")
    last_eval_s = forwarded[float | None]("clock")
    horizon_s = forwarded[float | None]("clock")
    horizon_from = forwarded[float]("clock")
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
        self.steps_left: int | None = None  # Trainer steps left to the run (the caller's, every step), if known
        self.metric_ceiling = metric_ceiling  # the gain metric's best value (1 for accuracy), None: unbounded
        self.candidates = list(candidates)
        self.budget_bytes, self.margin = budget_bytes, margin
        self.trial_steps, self.trial_max_s, self.search_share = trial_steps, trial_max_s, search_share
        self.exploration, self.discount = exploration, discount
        self.drift_threshold, self.retune_every_steps = drift_threshold, retune_every_steps
        self.clock = SearchClock(time_budget_s)
        self.has_batchnorm, self.bn_min_micro_batch, self.effective_batch = has_batchnorm, bn_min_micro_batch, effective_batch
        self.on_infeasible = on_infeasible
        # bytes of one host copy of the training state (weights, optimizer state) that count against the budget
        # (on a CPU the host is the device); a race holds two while it runs: the start and the best trial's end
        self.copy_bytes = 0.0
        # e.g. from the profile store: what ran out of memory in an earlier run on this model and device
        self.infeasible: dict[MemoryConfig, str] = dict(known_infeasible or {})
        # the budget under which each mark was made (None: unknown, e.g. the store's): a larger budget lifts it
        self.marked_under: dict[MemoryConfig, float | None] = {c: None for c in self.infeasible}
        self.cause = DecisionKind.START  # the event being answered: each decision's kind
        self.below_minimum = False  # the budget left no candidate: the smallest runs until it grows
        self.step_times = StepTimeLearner({c.config: c.step_s for c in self.candidates})
        self.current: MemoryConfig | None = None
        self.survivors = self._prune()  # raises ValueError when the budget is below the minimum
        self.arms: dict[MemoryConfig, ArmStats] = {c.config: ArmStats() for c in self.survivors}
        self.queue: list[MemoryConfig] = [c.config for c in self.survivors]
        self.baseline: float | None = None
        self.last_metric: float | None = None
        self.last_se: float | None = None
        self.trial_seconds = 0.0
        self.trial_steps_done = 0
        self.last_retune_step = 0
        self.last_peak: float | None = None
        self.race_state = RaceState()  # what the race has done and has left; saved under every strategy
        self._race = Race(self)  # the race's queries (`race_cost_s`, `stop_race`) answer under every strategy
        self.policy = STRATEGY_TYPES[strategy](self)
        self.decisions: list[Decision] = []

    # -------------------------------------------------------------- queries

    def _prune(self) -> list[Candidate]:
        """The survivors under the current budget. Before training, a budget below every candidate is the user's
        error (raised, naming the minimum); once training runs (the budget fell), the smallest candidate runs."""
        allowed = [self.candidate(c.config) for c in self.candidates if c.config not in self.infeasible]
        rules = dict(has_batchnorm=self.has_batchnorm, bn_min_micro_batch=self.bn_min_micro_batch,
                     effective_batch=self.effective_batch)
        self.below_minimum = False
        try:
            return prune(allowed, self.budget_bytes, self.margin, **rules)
        except ValueError:
            if self.current is None or not allowed:
                raise
        if self.has_batchnorm:
            allowed = batchnorm_filter(allowed, self.bn_min_micro_batch, self.effective_batch) or allowed
        smallest = min(allowed, key=lambda c: c.peak_bytes or 0.0)
        self.below_minimum = True
        return [smallest]

    def candidate(self, config: MemoryConfig) -> Candidate:
        """``config`` with its predicted peak and its step seconds as learned so far (`StepTimeLearner`)."""
        found = next((c for c in self.candidates if c.config == config), Candidate(config))
        return replace(found, step_s=self.step_times.corrected(config)) if found.step_s is not None else found

    @property
    def best(self) -> MemoryConfig | None:
        """The configuration with the best estimated gain per second (None before any estimate)."""
        rated = [(c, s.mean) for c, s in self.arms.items() if s.mean is not None]
        return max(rated, key=lambda x: x[1])[0] if rated else None

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

    # -------------------------------------------------------------- inputs

    def start(self, step: int, metric: float | None, se: float | None = None) -> MemoryConfig:
        """The first configuration to run; ``metric`` is the gain metric before any training (``se``: its
        standard error over the evaluation items, when known)."""
        self.baseline = self.last_metric = metric
        self.last_se = se
        self.cause = DecisionKind.START
        return self.policy.start(step)

    def observe_step(self, step: int, step_s: float, peak_bytes: float | None = None, timed: bool = True) -> bool:
        """Count one optimizer step of the current trial; True when the trial is over and a metric is wanted.
        ``timed``: ``step_s`` is a plain step's time (not one slowed by measuring its memory), so it corrects the
        configuration's predicted step time."""
        if timed and self.current is not None:
            self.step_times.observe(self.current, step_s)
        self.clock.elapsed_s += step_s
        self.trial_seconds += step_s
        self.trial_steps_done += 1
        self.last_peak = peak_bytes
        limit = usable_bytes(self.budget_bytes, self.margin)
        over = peak_bytes is not None and limit is not None and peak_bytes > limit
        if over and self.current is not None and not self.below_minimum:
            self.cause = DecisionKind.OVER_BUDGET
            self._mark(self.current, f"measured peak {peak_bytes / MIB:.1f} MiB > usable budget {limit / MIB:.1f} MiB")
            self.restart_trial()
            self.policy.on_infeasible(step, self.current, "over budget")
            return False
        retuned = bool(self.retune_every_steps) and step - self.last_retune_step >= self.retune_every_steps
        self.cause = DecisionKind.RETUNE if retuned else DecisionKind.TRIAL
        if retuned:
            self.last_retune_step = step
            self.reopen()
        return self.policy.wants_metric(step, retuned)

    def set_budget(self, step: int, budget_bytes: float | None) -> MemoryConfig:
        """The memory budget is now ``budget_bytes`` (another process took memory or gave it back): re-plan from
        the predicted peaks at this step boundary, before an out-of-memory error can happen. A lower budget
        moves off a configuration that no longer fits; a higher one lifts the marks made under a smaller budget
        and, when faster configurations fit again, re-opens the search. Returns the configuration to run."""
        old, self.budget_bytes = self.budget_bytes, budget_bytes
        self.cause = DecisionKind.BUDGET
        if budget_bytes is None or (old is not None and budget_bytes > old):
            for config in [c for c, b in self.marked_under.items() if b is not None and (budget_bytes is None or b < budget_bytes)]:
                del self.infeasible[config], self.marked_under[config]
        before = {c.config for c in self.survivors}
        self.survivors = self.reprune("a budget change")
        after = {c.config for c in self.survivors}
        self.queue = [c for c in self.queue if c in after]
        self.race_state.queue = [c for c in self.race_state.queue if c in after]
        note = f"budget {mib_text(old)} -> {mib_text(budget_bytes)}"
        if self.below_minimum:
            note += f", below every candidate's predicted peak: the smallest ({mib_text(self.survivors[0].peak_bytes)}) runs"
        if self.current is None:
            return self.current
        limit = usable_bytes(budget_bytes, self.margin)
        peak = self.candidate(self.current).peak_bytes
        if self.current not in after and (self.below_minimum or (limit is not None and (peak or 0.0) > limit)):
            self.restart_trial()
            return self.policy.on_infeasible(step, self.current, f"{note}: {self.current.short()} no longer fits")
        if after - before:
            self.reopen()
            self.restart_trial()
            return self.policy.restart(step, f"{note}: {len(after - before)} more candidate(s) fit")
        return self.decide(step, self.current, f"{note}: {self.current.short()} still fits")

    def add_search_time(self, seconds: float) -> None:
        """The caller spent ``seconds`` measuring the gain metric (it sets how long the next trials last)."""
        self.clock.add_search_time(seconds)

    def observe_metric(self, step: int, metric: float, proxy: bool = False, se: float | None = None) -> MemoryConfig:
        """The metric (higher is better) at the end of a trial, and its standard error over the evaluation items
        when known; returns the configuration for the next one."""
        previous = self.last_metric
        self.last_metric, self.last_se = metric, se
        self.cause = DecisionKind.TRIAL
        if proxy and self.drift_threshold is not None and previous is not None:
            jump = relative_change(metric, previous)
            if jump > self.drift_threshold:
                self.cause = DecisionKind.DRIFT
                self.reopen()
                self.baseline = metric
                self.restart_trial()
                return self.policy.restart(step, f"drift: proxy jumped by {jump:.0%}")
        return self.policy.on_metric(step, metric)

    def task_boundary(self, step: int, horizon_s: float | None = None, steps_left: int | None = None) -> MemoryConfig:
        """The data changed: discount what was learned, trial every survivor again (when the new task's
        ``horizon_s`` seconds, or under gain_per='step' its ``steps_left``, if known, pay for a race), re-measure
        the baseline."""
        self.cause = DecisionKind.TASK
        self.set_horizon(horizon_s)
        self.steps_left = steps_left  # the last task's count (0 at its end) says nothing of the new one
        self.reopen()
        self.baseline = None  # the caller's next `observe_metric` sets it on the new data
        self.restart_trial()
        return self.policy.restart(step, "task boundary", new_task=True)

    def set_baseline(self, metric: float, se: float | None = None) -> None:
        self.baseline = self.last_metric = metric
        self.last_se = se
        if self.racing and self.race_state.start_metric is None:
            self.race_state.start_metric = metric  # a race opened at a task boundary starts from the new data's metric

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

    def stop_race(self, step: int) -> MemoryConfig:
        """Training stopped in the middle of a race: keep the best trial that ended (``restore_best`` in
        `take_ops`; with none ended, the weights stay as they are), drop the race, and exploit that
        configuration; the next step end asks for the metric that begins a new race."""
        self.cause = DecisionKind.STOP
        return self._race.stop(step)

    def on_oom(self, step: int, config: MemoryConfig) -> MemoryConfig:
        """``config`` ran out of memory: it and every configuration predicted at least as large are infeasible."""
        self.cause = DecisionKind.OOM
        failed = self.candidate(config)
        self._mark(config, "out of memory")
        for c in self.candidates:
            if c.config not in self.infeasible and at_least_as_large(c, failed):
                self._mark(c.config, f"predicted larger than {config.short()}, which ran out of memory")
        self.restart_trial()
        return self.policy.on_infeasible(step, config, f"out of memory with {config.short()}")

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
        self.race_state.mid, self.race_state.want_mid = None, False

    def credit_trial(self, metric: float) -> None:
        """The trial that just ended (on the running weights) adds its gain per second to its configuration's
        estimate; ``metric`` is the next trial's baseline."""
        if self.baseline is not None and self.current is not None and self.trial_progress > 0:
            self.arms[self.current].add((metric - self.baseline) / self.trial_progress)
        self.baseline = self.last_metric = metric
        self.restart_trial()

    def reopen(self) -> None:
        """Search again: older estimates are discounted, the candidates are pruned again on the step times learned
        so far, and every survivor is due a trial."""
        self.survivors = self.reprune("re-pricing on measured step times")
        for stats in self.arms.values():
            stats.discount(self.discount)
        self.queue = [c.config for c in self.survivors]

    def roomy_survivors(self, copies: int = 2) -> list[Candidate]:
        """The survivors of the candidates under the budget less ``copies`` host copies: what a race can compare
        when the fastest of each trainable set leaves no room for its copies (e.g. a smaller micro-batch of it)."""
        usable = usable_bytes(self.budget_bytes, self.margin)
        if usable is None or not self.copy_bytes:
            return list(self.survivors)
        reduced = (usable - copies * self.copy_bytes) / (1.0 - self.margin)
        if reduced <= 0:
            return []
        allowed = [self.candidate(c.config) for c in self.candidates if c.config not in self.infeasible]
        try:
            return prune(allowed, reduced, self.margin, has_batchnorm=self.has_batchnorm,
                         bn_min_micro_batch=self.bn_min_micro_batch, effective_batch=self.effective_batch)
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
        """The survivors after configurations were marked infeasible (``reason``), keeping the arms that remain."""
        try:
            survivors = self._prune()
        except ValueError as exc:
            raise RuntimeError(
                f"No feasible configuration is left after {reason} ({len(self.infeasible)} marked infeasible): {exc}"
            ) from exc
        self.arms = {c.config: self.arms.get(c.config) or ArmStats() for c in survivors}
        return survivors

    def decide(self, step: int, choice: MemoryConfig, why: str) -> MemoryConfig:
        """Run ``choice`` next, logged as a `Decision` with ``why``."""
        self.current = choice
        cand = self.candidate(choice)
        self.decisions.append(
            Decision(
                step=step,
                elapsed_s=round(self.elapsed_s, 9),
                config=choice.to_dict(),
                predicted_peak_bytes=cand.peak_bytes,
                measured_peak_bytes=self.last_peak,
                gain_estimate=self.arms[choice].mean if choice in self.arms else None,
                reason=why,
                kind=DecisionKind(self.cause).value,
                budget_bytes=self.budget_bytes,
            )
        )
        return choice

    # -------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        return engine_state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_engine_state(self, state)
