"""The race strategy on simulated training: trials start from the same weights, the winner's end state is
kept, and re-races follow the training as the fast configuration saturates."""

from __future__ import annotations

import json
import math

import pytest

from mpopt_hf.config import MemoryConfig
from mpopt_hf.engine import Candidate, Outcome, RuleEngine, project_metric
from mpopt_hf.engine.events import (
    Action,
    Drop,
    Evaluate,
    Metric,
    Restore,
    Run,
    Snapshot,
    Start,
    StepBegin,
    StepDone,
    TaskBoundary,
)

FULL, HALF, HEAD = MemoryConfig(8), MemoryConfig(8, freeze_rate=0.5), MemoryConfig(8, freeze_rate=1.0)
# accuracy moves towards a ceiling at a rate: freezing trains faster per second but caps lower
CEILING = {FULL: 0.9, HALF: 0.7, HEAD: 0.3}
RATE = {FULL: 0.5, HALF: 1.5, HEAD: 4.0}
STEP_S = {FULL: 0.1, HALF: 0.04, HEAD: 0.02}


class SimulatedTraining:
    """The 'weights' are one number, the accuracy; the engine's state operations act on it."""

    def __init__(self, engine: RuleEngine, accuracy: float = 0.1, eval_s: float = 0.02):
        self.engine, self.accuracy, self.eval_s = engine, accuracy, eval_s
        self.copies: dict[str, float] = {}
        self.trial_starts: list[tuple[str, float]] = []  # (reason, accuracy when the trial began)
        self.seconds = 0.0

    def carry_out(self, actions: list[Action], step: int) -> MemoryConfig | None:
        """Carry out the engine's actions on the one-number 'weights'; returns the configuration it asks for."""
        config = None
        for action in actions:
            if isinstance(action, Snapshot):
                self.copies[action.which] = self.accuracy
            elif isinstance(action, Restore):
                self.accuracy = self.copies[action.which]
            elif isinstance(action, Drop):
                self.copies.clear()
            elif isinstance(action, Run):
                config = action.config
            elif isinstance(action, Evaluate):
                config = self.carry_out(self.engine.step(Metric(step=step, value=self.evaluate(), eval_s=self.eval_s)),
                                        step) or config
        return config

    def evaluate(self) -> float:
        self.seconds += self.eval_s
        return self.accuracy

    def run(self, seconds: float, horizon_s: float | None = None) -> None:
        start = Start(step=0, metric=self.evaluate(), eval_s=self.eval_s, horizon_s=horizon_s)
        config = self.carry_out(self.engine.step(start), 0)
        step = 0
        while self.seconds < seconds:
            self.carry_out(self.engine.step(StepBegin(step=step)), step)
            if len(self.trial_starts) < len(self.engine.decisions):
                # (outcome, trials of this race ended before it, accuracy): a race's first trial has none
                self.trial_starts.append((self.engine.decisions[-1].outcome, len(self.engine.race_trials), self.accuracy))
            step += 1
            dt = STEP_S[config]
            self.accuracy += RATE[config] * (CEILING[config] - self.accuracy) * dt
            self.seconds += dt
            config = self.carry_out(self.engine.step(StepDone(step=step, seconds=dt)), step) or config


def test_a_trial_is_judged_on_its_second_half():
    cands = [Candidate(FULL, None, 0.1), Candidate(HEAD, None, 0.02)]
    engine = RuleEngine(cands, trial_steps=4)
    engine.start(0, 0.5)
    wants = [engine.observe_step(i, 1.0) for i in (1, 2)]
    assert wants == [False, True]  # half-way through the 4-step trial: a metric is wanted
    assert engine.observe_metric(2, 0.40) == FULL and len(engine.decisions) == 1  # a dip; the trial goes on
    assert [engine.observe_step(i, 1.0) for i in (3, 4)] == [False, True]
    assert engine.observe_metric(4, 0.50) == HEAD  # FULL: 0.40 -> 0.50 over its second half (2 s): 0.05/s
    assert engine.race_trials[FULL].gain == pytest.approx(0.05)
    assert [engine.observe_step(i, 1.0) for i in (5, 6)] == [False, True]  # HEAD's trial lasts as long: 4 s
    engine.observe_metric(6, 0.56)
    engine.observe_step(7, 1.0)
    engine.observe_step(8, 1.0)
    # HEAD: 0.56 -> 0.58 is 0.01/s; judged from the race's start it would be 0.08 / 4 s = 0.02/s, still less than
    # FULL's 0.05/s, which from the start would have been 0.0/s
    assert engine.observe_metric(8, 0.58) == FULL and engine.race_trials[HEAD].gain == pytest.approx(0.01)


def _engine(**kwargs) -> RuleEngine:
    cands = [Candidate(c, None, STEP_S[c]) for c in (FULL, HALF, HEAD)]
    return RuleEngine(cands, trial_steps=2, search_share=0.1, **kwargs)


def test_every_race_trial_starts_from_the_same_weights():
    sim = SimulatedTraining(_engine())
    sim.run(30.0)
    races: list[list[float]] = []
    for outcome, ended, accuracy in sim.trial_starts:
        if outcome == Outcome.RACE_TRIAL and ended == 0:
            races.append([accuracy])
        elif outcome == Outcome.RACE_TRIAL:
            races[-1].append(accuracy)
    assert len(races) >= 3 and all(len(r) == 3 for r in races)
    for starts in races:
        assert starts == [starts[0]] * 3  # trials 2 and 3 were restored to where trial 1 began


def test_each_candidate_is_judged_by_the_metric_it_would_reach_by_the_horizon():
    engine = _engine()
    sim = SimulatedTraining(engine)
    sim.run(40.0)
    winners = [MemoryConfig.from_dict(d.config) for d in engine.decisions if d.outcome == Outcome.RACE_WON]
    # half-frozen gains fastest over the 0.2 s trials, but its two halves show it slowing towards 0.7; over the
    # exploitation the race buys (~5 s), full training gets further
    first = engine.decisions[3]
    assert winners[0] == FULL and first.outcome == Outcome.RACE_WON
    assert sim.accuracy > 0.88  # the best fixed configuration in hindsight (FULL for 40 s) ends at ~0.9
    cost = engine.search_seconds + engine.discarded_seconds
    assert cost / sim.seconds < 0.15  # the search's own cost stays near search_share of the time

    short = RuleEngine([Candidate(c, None, STEP_S[c]) for c in (FULL, HALF, HEAD)], trial_steps=2, search_share=0.4)
    SimulatedTraining(short).run(1.0, horizon_s=2.0)  # ~1.3 s left after the race: half-frozen gets further in that
    assert [MemoryConfig.from_dict(d.config) for d in short.decisions if d.outcome == Outcome.RACE_WON] == [HALF]


def test_projection_follows_an_exponential_approach_and_extends_a_steady_climb():
    def curve(t):  # 0.2 -> 0.8 at rate 2/s
        return 0.8 - 0.6 * math.exp(-2.0 * t)

    projected = project_metric(curve(0), curve(0.25), 0.25, curve(0.5), 0.5, horizon_s=1.5)
    assert projected == pytest.approx(curve(2.0), abs=1e-9)
    assert project_metric(0.2, 0.3, 1.0, 0.45, 2.0, horizon_s=2.0) == pytest.approx(0.75)  # speeding up: linear
    assert project_metric(0.2, 0.3, 1.0, 0.45, 2.0, horizon_s=20.0, ceiling=1.0) == 1.0
    assert project_metric(0.2, 0.5, 1.0, 0.45, 2.0, horizon_s=20.0) == 0.45  # falling: no further gain
    assert project_metric(0.2, 0.1, 1.0, 0.3, 2.0, horizon_s=1.0) == pytest.approx(0.5)  # a dip, then a climb
    # a slowdown within the noise of the changes is not a ceiling: 0.10 then 0.07 with a standard error of 0.02
    assert project_metric(0.2, 0.3, 1.0, 0.37, 2.0, horizon_s=1.0, noise=0.02) == pytest.approx(0.44)
    assert project_metric(0.2, 0.3, 1.0, 0.37, 2.0, horizon_s=1.0) < 0.42  # without noise it is one


def test_out_of_memory_in_a_race_trial_restores_its_start_and_goes_on():
    engine = _engine(late_gain=False)  # one metric per trial, at its end
    first = engine.start(0, 0.1)
    assert first == FULL and engine.take_ops() == ["snapshot"]  # slowest first
    engine.observe_step(1, 0.1)
    engine.observe_step(2, 0.1)
    second = engine.observe_metric(2, 0.2)
    assert engine.take_ops() == ["save_best", "restore_start"]
    third = engine.on_oom(3, second)
    assert third != second and second in engine.infeasible
    assert engine.take_ops() == ["restore_start"] and engine.racing


def test_race_state_round_trips_through_json():
    engine = _engine()
    sim = SimulatedTraining(engine)
    sim.run(3.0)
    state = json.loads(json.dumps(engine.state_dict()))
    restored = _engine()
    restored.load_state_dict(state)
    assert restored.state_dict() == engine.state_dict()


@pytest.mark.parametrize("head_lead, significance, winner", [(0.05, 2.0, FULL), (0.09, 2.0, HEAD), (0.05, 1.0, HEAD)])
def test_a_lead_within_the_significance_goes_to_the_least_frozen(head_lead, significance, winner):
    cands = [Candidate(FULL, None, 0.1), Candidate(HEAD, None, 0.02)]
    engine = RuleEngine(cands, trial_steps=1, significance=significance)  # standard error 0.04 below
    assert engine.start(0, 0.5, se=0.04) == FULL
    engine.observe_step(1, 1.0)
    assert engine.observe_metric(1, 0.6, se=0.04) == HEAD
    engine.observe_step(2, 1.0)
    assert engine.observe_metric(2, 0.6 + head_lead, se=0.04) == winner
    assert engine.decisions[-1].outcome == Outcome.RACE_WON
    assert engine.race_winner() == (winner, winner == FULL)  # FULL wins only as the least frozen of a tie
    # FULL's end state was kept when its trial ended; HEAD's replaces it only when HEAD wins
    assert engine.take_ops() == ["snapshot", "save_best", "restore_start"] + (
        ["restore_best", "drop"] if winner == FULL else ["save_best", "drop"])


def _evaluations(sim: SimulatedTraining) -> int:
    return round(sim.engine.search_seconds / sim.eval_s)


def test_a_race_that_cannot_pay_for_itself_in_the_time_left_is_not_run():
    engine = _engine()
    sim = SimulatedTraining(engine)
    sim.run(2.0, horizon_s=2.0)  # a race costs ~0.5 s here, over search_share=0.1 of 2 s
    assert (engine.decisions[0].kind, engine.decisions[0].outcome) == ("start", Outcome.NO_RACE_COST)
    cost = engine.race_cost_s([FULL, HALF, HEAD])
    assert cost == pytest.approx(0.52) and cost > 0.1 * 2.0  # over search_share of the 2 s
    assert [MemoryConfig.from_dict(d.config) for d in engine.decisions] == [FULL]  # the least frozen, all along
    assert engine.discarded_seconds == 0 and _evaluations(sim) == 1  # only the start's evaluation was spent


def test_the_estimated_race_cost_matches_what_the_race_cost():
    engine = _engine()
    sim = SimulatedTraining(engine)
    engine.add_search_time(sim.eval_s)  # the start's evaluation: its time sizes the trials
    predicted = engine.race_cost_s([FULL, HALF, HEAD])
    engine.search_seconds = 0.0
    sim.run(3.0, horizon_s=100.0)
    assert any(d.outcome == Outcome.RACE_WON for d in engine.decisions)
    spent = engine.discarded_seconds + engine.search_seconds - sim.eval_s  # less the start's evaluation
    assert predicted == pytest.approx(0.52) and spent == pytest.approx(predicted, rel=0.2)


def test_near_the_end_of_the_horizon_the_winner_is_exploited_without_a_new_race():
    engine = _engine()
    sim = SimulatedTraining(engine)
    sim.run(8.0, horizon_s=8.0)
    races = [d for d in engine.decisions if d.outcome == Outcome.RACE_WON]
    assert len(races) == 1  # unbounded, the same run races again once its first exploitation ends
    last = engine.decisions[-1]
    assert last.outcome == Outcome.EXPLOITATION_OVER and MemoryConfig.from_dict(last.config) == engine.current
    assert _evaluations(sim) == 1 + 3 * 2  # start, then a half-way and an end evaluation per trial; none after
    unbounded = _engine()
    SimulatedTraining(unbounded).run(8.0)
    assert sum(d.outcome == Outcome.RACE_WON for d in unbounded.decisions) > 1


def test_a_short_task_keeps_the_last_race_winner_and_a_long_one_races_again():
    engine = _engine()
    sim = SimulatedTraining(engine)
    sim.run(3.0)
    winner = engine.race_incumbent
    assert winner is not None and not engine.racing
    assert engine.task_boundary(100, horizon_s=1.0) == winner and engine.take_ops() == []
    assert (engine.decisions[-1].kind, engine.decisions[-1].outcome) == ("task", Outcome.NO_RACE_COST)
    assert engine.task_boundary(200, horizon_s=60.0) == FULL and engine.take_ops() == ["snapshot"]
    assert (engine.decisions[-1].kind, engine.decisions[-1].outcome) == ("task", Outcome.RACE_TRIAL)
    assert len(engine.race_state.queue) == 2 and engine.race_trials == {}  # race 1 of 3
    state = json.loads(json.dumps(engine.state_dict()))
    restored = _engine()
    restored.load_state_dict(state)
    assert restored.time_left_s == pytest.approx(engine.time_left_s) == pytest.approx(60.0)
    with pytest.raises(ValueError, match="seconds > 0 or None"):
        engine.set_horizon(0)


def _race_linear(gain_per: str, late_gain: bool) -> tuple[RuleEngine, dict[MemoryConfig, int]]:
    """A race of FULL (+0.010 a step, 0.125 s a step: 0.08/s) against HALF (+0.006 a step, 0.0625 s: 0.096/s)."""
    per_step, seconds = {FULL: 0.010, HALF: 0.006}, {FULL: 0.125, HALF: 0.0625}
    engine = RuleEngine([Candidate(c, None, seconds[c]) for c in (FULL, HALF)], trial_steps=4, late_gain=late_gain,
                        gain_per=gain_per)
    metric, copies, steps_run = 0.2, {}, {FULL: 0, HALF: 0}
    config = engine.start(0, metric)
    for step in range(1, 40):
        for op in engine.take_ops():
            if op in ("snapshot", "save_best"):
                copies["start" if op == "snapshot" else "best"] = metric
            elif op.startswith("restore_"):
                metric = copies[op.removeprefix("restore_")]
        if not engine.racing and engine.race_trials:
            break
        metric += per_step[config]
        steps_run[config] += 1
        if engine.observe_step(step, seconds[config]):
            config = engine.observe_metric(step, metric)
    return engine, steps_run


@pytest.mark.parametrize("late_gain", [False, True])
def test_gain_per_second_picks_the_faster_learner_per_second_and_per_step_the_one_that_learns_more_a_step(late_gain):
    by_time, steps_by_time = _race_linear("second", late_gain)
    by_step, steps_by_step = _race_linear("step", late_gain)
    assert by_time.race_winner()[0] == HALF and by_time.current == HALF  # 0.096/s against 0.08/s
    assert by_step.race_winner()[0] == FULL and by_step.current == FULL  # 0.010 a step against 0.006
    # trials last the same seconds (FULL's 4 steps: 0.5 s = HALF's 8 steps), or the same steps
    assert steps_by_time == {FULL: 4, HALF: 8}
    assert steps_by_step == {FULL: 4, HALF: 4}
    assert by_step.race_trials[FULL].gain == pytest.approx(0.010) and by_step.race_trials[HALF].gain == pytest.approx(0.006)
    assert by_time.race_trials[HALF].gain == pytest.approx(0.096)


def test_gain_per_is_checked():
    with pytest.raises(ValueError, match="gain_per must be one of"):
        RuleEngine([Candidate(FULL, None, 0.1)], gain_per="sample")
    from mpopt_hf import MPOptArguments
    with pytest.raises(ValueError, match="gain_per"):
        MPOptArguments(gain_per="minute")


@pytest.mark.parametrize("steps_left, races", [(36, False), (400, True), (None, True)])
def test_under_gain_per_step_a_race_must_pay_in_the_steps_it_throws_away(steps_left, races):
    engine = RuleEngine([Candidate(FULL, None, 0.125), Candidate(HALF, None, 0.0625)], trial_steps=4,
                        search_share=0.05, gain_per="step")
    # one trial of 4 steps is thrown away: 4 <= 0.05 x 400, > 0.05 x 36
    assert engine.step(Start(step=0, metric=0.2, steps_left=steps_left)) == [Run(FULL)]  # the least frozen first
    assert engine.racing is races
    if not races:
        assert engine.decisions[-1].outcome == Outcome.NO_RACE_COST  # 4 steps thrown away > 0.05 x 36


def test_a_task_boundary_takes_the_new_tasks_steps_not_the_last_ones_zero():
    engine = RuleEngine([Candidate(FULL, None, 0.125), Candidate(HALF, None, 0.0625)], trial_steps=4,
                        search_share=0.05, gain_per="step")
    engine.step(Start(step=0, metric=0.2, steps_left=36))
    assert not engine.racing  # 4 steps thrown away > 0.05 x 36
    engine.step(StepDone(step=36, seconds=0.125, steps_left=0))  # the end of the first task
    engine.step(TaskBoundary(step=36, steps_left=400))
    assert engine.racing and engine.steps_left == 400
    engine.step(TaskBoundary(step=436))  # a task of unknown length: the race is judged per step, its cost not refused
    assert engine.steps_left is None and engine.racing
    direct = RuleEngine([Candidate(FULL, None, 0.125), Candidate(HALF, None, 0.0625)], trial_steps=4,
                        search_share=0.05, gain_per="step")
    direct.start(0, 0.2)
    direct.steps_left = 0  # called directly (no event), task_boundary takes the new task's count itself
    direct.task_boundary(36, steps_left=400)
    assert direct.racing and direct.steps_left == 400


def test_a_step_race_resumes_mid_trial_with_its_units_and_refuses_another_unit():
    def fresh(gain_per):
        return RuleEngine([Candidate(FULL, None, 0.125), Candidate(HALF, None, 0.0625)], trial_steps=4,
                          gain_per=gain_per)
    engine = fresh("step")
    engine.steps_left = 400
    engine.start(0, 0.2)
    for step in range(1, 5):  # FULL's trial, with its half-way metric, then HALF's first step
        if engine.observe_step(step, 0.125):
            engine.observe_metric(step, 0.2 + 0.01 * step)
    engine.observe_step(5, 0.0625)
    saved = json.loads(json.dumps(engine.state_dict()))
    resumed = fresh("step")
    resumed.load_state_dict(saved)
    assert resumed.race_state.trial_steps == engine.race_state.trial_steps == 4
    assert resumed.race_state.horizon_steps == engine.race_state.horizon_steps == 400 - 4 - 4
    assert resumed.trial_progress == engine.trial_progress == 1.0
    with pytest.raises(ValueError, match="counts gains per step, this engine per second"):
        fresh("second").load_state_dict(saved)


def test_a_tie_at_the_cap_is_reported_as_a_tie_even_when_the_least_frozen_leads():
    """Setting A's races (BENCHMARKS): both projections reach the ceiling, full training is first in race order and
    so the nominal leader; the decision must still say that a tie, not a lead, chose it."""
    from mpopt_hf.engine.candidates import RaceTrial
    from mpopt_hf.engine.scoring import judge_race

    trials = {FULL: RaceTrial(0.075, 0.133, 0.75, 0.03, 1.0), HALF: RaceTrial(0.087, 0.289, 0.79, 0.04, 1.0)}
    assert judge_race(trials, 0.75, 2.0) == (FULL, True)
    clear = {FULL: RaceTrial(0.2, 0.5, 0.75, 0.03, 0.9), HALF: RaceTrial(0.05, 0.3, 0.79, 0.04, 0.6)}
    assert judge_race(clear, 0.75, 2.0) == (FULL, False)
