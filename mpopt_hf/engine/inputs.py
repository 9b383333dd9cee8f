"""What the engine is told, as methods and as events (`step`): the inputs of `RuleEngine`, kept apart from its shell
(`engine`) so that each reads on its own. `step` turns an `events.Event` into the calls below and answers the
`events.Action` list the caller carries out; the methods stay callable for tests that drive one input at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import MIB, MemoryConfig
from .candidates import Choice, DecisionKind, Outcome
from .events import (
    Action,
    Baseline,
    BudgetChanged,
    Evaluate,
    Event,
    Metric,
    OutOfMemory,
    Run,
    Start,
    StepBegin,
    StepDone,
    Stop,
    TaskBoundary,
    TrainEnd,
    copy_actions,
)
from .forwarding import mib_text
from .rules import at_least_as_large, usable_bytes
from .scoring import relative_change

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RuleEngine


class EngineInputs:
    """The inputs of `RuleEngine` (a mixin: the state they change is the engine's)."""

    def step(self: RuleEngine, event: Event) -> list[Action]:
        """Answer ``event`` with the actions the caller carries out, in order (see `events`)."""
        if not isinstance(event, Event):
            raise TypeError(f"RuleEngine.step: unknown event {event!r}; see mpopt_hf.engine.events.")
        self.steps_left = event.steps_left
        if isinstance(event, StepBegin):
            return copy_actions(self.take_ops())
        if isinstance(event, StepDone):
            before = self.current
            if self.observe_step(event.step, event.seconds, event.peak_bytes, timed=event.timed):
                return [Evaluate()]  # the `Metric` that answers it says whether time is spent
            return ([Run(self.current)] if self.current != before else []) + self._stop_if_spent()
        if isinstance(event, Metric):
            self.add_search_time(event.eval_s)
            config = self.observe_metric(event.step, event.value, proxy=event.proxy, se=event.se)
            return [Run(config), *self._stop_if_spent()]
        if isinstance(event, Baseline):
            self.add_search_time(event.eval_s)
            self.set_baseline(event.value, event.se)
            return []
        if isinstance(event, Start):
            self.set_horizon(event.horizon_s)
            self.add_search_time(event.eval_s)
            return [Run(self.start(event.step, event.metric, event.se))]
        if isinstance(event, OutOfMemory):
            return [Run(self.on_oom(event.step, event.config)), *copy_actions(self.take_ops())]
        if isinstance(event, TaskBoundary):
            return [Run(self.task_boundary(event.step, event.horizon_s, event.steps_left))]
        if isinstance(event, BudgetChanged):
            config = self.set_budget(event.step, event.budget_bytes)
            return [] if config is None else [Run(config)]
        if isinstance(event, TrainEnd):
            # stopped during a race: the weights of the best trial that ended are the run's result, and a later
            # train() goes on from them with a new race
            actions: list[Action] = [Run(self.stop_race(event.step))] if self.racing else []
            return actions + copy_actions(self.take_ops())
        raise TypeError(f"RuleEngine.step: unknown event {event!r}; see mpopt_hf.engine.events.")

    def _stop_if_spent(self: RuleEngine) -> list[Action]:
        return [Stop()] if self.out_of_time else []


    def start(self: RuleEngine, step: int, metric: float | None, se: float | None = None) -> MemoryConfig:
        """The first configuration to run; ``metric`` is the gain metric before any training (``se``: its
        standard error over the evaluation items, when known)."""
        self.go_on_from(metric)
        self.last_se = se
        self.cause = DecisionKind.START
        return self.decide(step, self.policy.start(step))

    def observe_step(self: RuleEngine, step: int, step_s: float, peak_bytes: float | None = None, timed: bool = True) -> bool:
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
            self.decide(step, self.policy.on_infeasible(step, self.current, "over budget"))
            return False
        retuned = bool(self.retune_every_steps) and step - self.last_retune_step >= self.retune_every_steps
        self.cause = DecisionKind.RETUNE if retuned else DecisionKind.TRIAL
        if retuned:
            self.last_retune_step = step
            self.reopen()
        wanted = self.policy.wants_metric(step, retuned)
        if isinstance(wanted, Choice):
            self.decide(step, wanted)  # not now, and the strategy says why
            return False
        return bool(wanted)

    def set_budget(self: RuleEngine, step: int, budget_bytes: float | None) -> MemoryConfig:
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
        after = {c.config for c in self.reprune("a budget change")}
        note = f"budget {mib_text(old)} -> {mib_text(budget_bytes)}"
        if self.below_minimum:
            note += f", below every candidate's predicted peak: the smallest ({mib_text(self.survivors[0].peak_bytes)}) runs"
        if self.current is None:
            return self.current
        limit = usable_bytes(budget_bytes, self.margin)
        peak = self.candidate(self.current).peak_bytes
        if self.current not in after and (self.below_minimum or (limit is not None and (peak or 0.0) > limit)):
            self.restart_trial()
            return self.decide(step, self.policy.on_infeasible(step, self.current,
                                                               f"{note}: {self.current.short()} no longer fits"))
        if after - before:
            self.reopen()
            self.restart_trial()
            return self.decide(step, self.policy.restart(step, f"{note}: {len(after - before)} more candidate(s) fit"))
        return self.decide(step, Choice(self.current, Outcome.STILL_FITS, f"{note}: {self.current.short()} still fits"))

    def add_search_time(self: RuleEngine, seconds: float) -> None:
        """The caller spent ``seconds`` measuring the gain metric (it sets how long the next trials last)."""
        self.clock.add_search_time(seconds)

    def observe_metric(self: RuleEngine, step: int, metric: float, proxy: bool = False, se: float | None = None) -> MemoryConfig:
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
                return self.decide(step, self.policy.restart(step, f"drift: proxy jumped by {jump:.0%}"))
        return self.decide(step, self.policy.on_metric(step, metric))

    def task_boundary(self: RuleEngine, step: int, horizon_s: float | None = None, steps_left: int | None = None) -> MemoryConfig:
        """The data changed: discount what was learned, trial every survivor again (when the new task's
        ``horizon_s`` seconds, or under gain_per='step' its ``steps_left``, if known, pay for a race), re-measure
        the baseline."""
        self.cause = DecisionKind.TASK
        self.set_horizon(horizon_s)
        self.steps_left = steps_left  # the last task's count (0 at its end) says nothing of the new one
        self.reopen()
        self.baseline = None  # the caller's next `observe_metric` sets it on the new data
        self.restart_trial()
        return self.decide(step, self.policy.restart(step, "task boundary", new_task=True))

    def set_baseline(self: RuleEngine, metric: float, se: float | None = None) -> None:
        self.go_on_from(metric)
        self.last_se = se
        self._race.start_from(metric)  # a race opened at a task boundary starts from the new data's metric

    def take_ops(self: RuleEngine) -> list[str]:
        """What the caller must do to the weights (with optimizer and scheduler state) before the next step:

        * ``snapshot``: copy them as the race's start;
        * ``save_best``: copy them as the best race trial's end state so far;
        * ``restore_start``: load the race's start (the next trial starts where the others did);
        * ``restore_best``: load the best trial's end state (the winner, when it was not the last trial);
        * ``drop``: forget both copies (the race is over).
        """
        return self._race.take_ops()

    def stop_race(self: RuleEngine, step: int) -> MemoryConfig:
        """Training stopped in the middle of a race: keep the best trial that ended (``restore_best`` in
        `take_ops`; with none ended, the weights stay as they are), drop the race, and exploit that
        configuration; the next step end asks for the metric that begins a new race."""
        self.cause = DecisionKind.STOP
        return self.decide(step, self._race.stop(step))

    def on_oom(self: RuleEngine, step: int, config: MemoryConfig) -> MemoryConfig:
        """``config`` ran out of memory: it and every configuration predicted at least as large are infeasible."""
        self.cause = DecisionKind.OOM
        failed = self.candidate(config)
        self._mark(config, "out of memory")
        for c in self.candidates:
            if c.config not in self.infeasible and at_least_as_large(c, failed):
                self._mark(c.config, f"predicted larger than {config.short()}, which ran out of memory")
        self.restart_trial()
        return self.decide(step, self.policy.on_infeasible(step, config, f"out of memory with {config.short()}"))
