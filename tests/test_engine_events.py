"""The engine's interface: events in, actions out (`RuleEngine.step`), on simulated numbers and with no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mpopt_hf.config import MemoryConfig
from mpopt_hf.engine import MIB, Candidate, DecisionKind, RuleEngine
from mpopt_hf.engine.events import (
    Baseline,
    BudgetChanged,
    Drop,
    Evaluate,
    Metric,
    OutOfMemory,
    Restore,
    Run,
    Snapshot,
    Start,
    StepBegin,
    StepDone,
    Stop,
    TaskBoundary,
    TrainEnd,
    copy_actions,
)

FULL, HALF = MemoryConfig(8), MemoryConfig(8, freeze_rate=0.5)
SMALL = MemoryConfig(2)  # a smaller micro-batch of FULL's trainable set: less memory, slower


def _race(**kwargs) -> RuleEngine:
    cands = [Candidate(FULL, 100 * MIB, 0.1), Candidate(HALF, 60 * MIB, 0.05), Candidate(SMALL, 40 * MIB, 0.2)]
    return RuleEngine(cands, trial_steps=2, late_gain=False, **kwargs)


def _full_trial_done(engine: RuleEngine) -> list:
    """Start the race, run FULL's trial of two steps and answer its metric: HALF's trial is next."""
    engine.step(Start(step=0, metric=0.1))
    engine.step(StepBegin(step=0))
    engine.step(StepDone(step=1, seconds=0.1))
    engine.step(StepDone(step=2, seconds=0.1))
    return engine.step(Metric(step=2, value=0.3))


def _kinds(engine: RuleEngine) -> list[str]:
    return [d.kind for d in engine.decisions]


def test_a_race_runs_through_events_and_its_copies_wait_for_a_step_boundary():
    engine = _race()
    assert engine.step(Start(step=0, metric=0.1)) == [Run(FULL)]  # the least frozen first; SMALL is dominated
    assert engine.step(StepBegin(step=0)) == [Snapshot("start")]  # the race's start, before its first step
    assert engine.step(StepDone(step=1, seconds=0.1)) == []
    assert engine.step(StepDone(step=2, seconds=0.1)) == [Evaluate()]
    assert engine.step(Metric(step=2, value=0.3, eval_s=0.01)) == [Run(HALF)]
    # the copies are asked for at the next step boundary, where the caller can act on the weights
    assert engine.step(StepBegin(step=2)) == [Snapshot("best"), Restore("start")]
    assert engine.step(StepBegin(step=2)) == []  # released once
    # every trial of a race lasts as long as the first (0.2 s): four of HALF's 0.05 s steps
    assert [engine.step(StepDone(step=s, seconds=0.05)) for s in (3, 4, 5, 6)] == [[], [], [], [Evaluate()]]
    assert engine.step(Metric(step=6, value=0.2)) == [Run(FULL)]  # FULL gained more: its end state is restored
    assert engine.step(StepBegin(step=6)) == [Restore("best"), Drop()]
    assert _kinds(engine) == [DecisionKind.START.value, DecisionKind.TRIAL.value, DecisionKind.TRIAL.value]
    assert engine.search_seconds == pytest.approx(0.01)  # a Metric's eval_s is search time


def test_out_of_memory_answers_the_next_configuration_and_undoes_the_partial_trial_at_once():
    engine = _race()
    assert _full_trial_done(engine) == [Run(HALF)]
    actions = engine.step(OutOfMemory(step=3, config=HALF))
    # HALF and what is predicted at least as large (FULL) are marked: FULL, whose trial ended, wins the race and
    # goes on as its smaller micro-batch, from its own end state
    assert actions[0] == Run(SMALL) and {HALF, FULL} <= set(engine.infeasible)
    # the step runs again at once: the pending copies come with the answer, not at a later step boundary
    assert actions[1:] == [Snapshot("best"), Restore("start"), Restore("start"), Restore("best"), Drop()]
    assert engine.decisions[-1].kind == DecisionKind.OOM.value and not engine.racing


def test_a_budget_change_re_plans_and_is_a_budget_decision():
    engine = RuleEngine([Candidate(FULL, 100 * MIB, 0.1), Candidate(SMALL, 40 * MIB, 0.2)], budget_bytes=200 * MIB,
                        strategy="ucb", trial_steps=2)
    assert engine.step(Start(step=0, metric=0.1)) == [Run(FULL)]  # the fastest that fits
    assert engine.step(BudgetChanged(step=5, budget_bytes=60 * MIB)) == [Run(SMALL)]
    assert engine.decisions[-1].kind == DecisionKind.BUDGET.value and engine.budget_bytes == 60 * MIB
    assert engine.step(BudgetChanged(step=9, budget_bytes=200 * MIB))[0] == Run(FULL)  # it fits again


def test_a_measured_peak_over_the_budget_moves_at_the_next_step():
    engine = RuleEngine([Candidate(FULL, 100 * MIB, 0.1), Candidate(SMALL, 40 * MIB, 0.2)], budget_bytes=200 * MIB,
                        strategy="ucb", trial_steps=2, margin=0.0)
    engine.step(Start(step=0, metric=0.1))
    assert engine.step(StepDone(step=1, seconds=0.1, peak_bytes=250 * MIB)) == [Run(SMALL)]
    assert engine.decisions[-1].kind == DecisionKind.OVER_BUDGET.value


def test_training_time_spent_stops_training_after_the_metric_that_ends_the_trial():
    engine = RuleEngine([Candidate(FULL, None, 0.1), Candidate(HALF, None, 0.05)], trial_steps=1, time_budget_s=0.15,
                        strategy="ucb")
    engine.step(Start(step=0, metric=0.1))
    assert engine.step(StepDone(step=1, seconds=0.1)) == [Evaluate()]  # the trial is over: its metric decides
    assert Stop() not in engine.step(Metric(step=1, value=0.2, eval_s=1.0))  # evaluating is not training time
    assert engine.step(StepDone(step=2, seconds=0.1)) == [Evaluate()]
    assert engine.step(Metric(step=2, value=0.3))[-1] == Stop()  # 0.2 s of training >= time_budget_s
    assert engine.out_of_time


def test_a_baseline_and_a_task_boundary_restart_from_the_new_data():
    engine = _race(search_share=0.05, gain_per="step")
    engine.step(Start(step=0, metric=0.2, steps_left=36))  # a race would throw away 2 steps > 0.05 x 36
    assert not engine.racing
    assert engine.step(TaskBoundary(step=36, steps_left=400)) == [Run(FULL)]  # 2 <= 0.05 x 400: it races
    assert engine.racing and engine.steps_left == 400 and engine.baseline is None
    assert engine.step(Baseline(step=36, value=0.05, eval_s=0.5, steps_left=400)) == []
    assert engine.baseline == 0.05 and engine.race_state.start_metric == 0.05 and engine.search_seconds == 0.5
    assert engine.decisions[-1].kind == DecisionKind.TASK.value


def test_train_end_keeps_the_best_trial_that_ended():
    engine = _race()
    _full_trial_done(engine)  # FULL's trial ended; HALF's begins
    engine.step(StepBegin(step=2))
    actions = engine.step(TrainEnd(step=3))
    assert actions == [Run(FULL), Restore("best"), Drop()] and not engine.racing
    assert engine.decisions[-1].kind == DecisionKind.STOP.value
    assert engine.step(TrainEnd(step=3)) == []  # nothing left to stop


def test_unknown_events_and_operations_are_refused():
    engine = _race()
    with pytest.raises(TypeError, match="unknown event"):
        engine.step("step done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'restore_middle'"):
        copy_actions(["snapshot", "restore_middle"])


def test_the_engine_and_its_events_import_no_torch():
    code = ("import sys; import mpopt_hf.engine as e; e.enumerate_configs([8, 4], [0.0, 0.5], [0, 1], ['fp32'], 4); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- the baselines as strategies


def _halving_space() -> list[Candidate]:
    return [Candidate(MemoryConfig(mb, freeze_rate=f), None, 0.1) for f in (0.0, 0.5) for mb in (8, 4, 2, 1)]


def test_fixed_runs_its_configuration_asks_for_no_metric_and_ends_at_out_of_memory():
    engine = RuleEngine([Candidate(FULL, None, 0.1), Candidate(HALF, None, 0.05)], strategy="fixed", trial_steps=1)
    assert not engine.measures
    assert engine.step(Start(step=0, metric=None)) == [Run(FULL)]
    assert [engine.step(StepDone(step=s, seconds=0.1)) for s in range(1, 20)] == [[]] * 19  # never an evaluation
    assert engine.step(TaskBoundary(step=20)) == [Run(FULL)]
    with pytest.raises(RuntimeError, match=r"strategy='fixed' cannot leave mb8/f0.00/ckpt0/fp32: out of memory"):
        engine.step(OutOfMemory(step=21, config=FULL))


def test_halving_starts_at_the_largest_micro_batch_halves_at_each_oom_and_never_grows_back():
    engine = RuleEngine(_halving_space(), strategy="halving", budget_bytes=None)
    assert engine.step(Start(step=0, metric=None)) == [Run(MemoryConfig(8))]  # the first of the largest: f0
    assert engine.step(OutOfMemory(step=1, config=MemoryConfig(8)))[0] == Run(MemoryConfig(4))
    assert engine.step(OutOfMemory(step=1, config=MemoryConfig(4)))[0] == Run(MemoryConfig(2))
    assert engine.step(BudgetChanged(step=5, budget_bytes=None)) == [Run(MemoryConfig(2))]  # no growing back
    assert [d.kind for d in engine.decisions] == ["start", "oom", "oom", "budget"]
    assert engine.step(OutOfMemory(step=6, config=MemoryConfig(2)))[0] == Run(MemoryConfig(1))
    with pytest.raises(RuntimeError, match="no micro-batch of at most 0 is left"):
        engine.step(OutOfMemory(step=7, config=MemoryConfig(1)))
