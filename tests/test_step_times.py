"""Step times learned online correct the cost model's predictions (issue 19): pure, on simulated times."""

from __future__ import annotations

import pytest

from mpopt_hf import MemoryConfig
from mpopt_hf.engine import Candidate, RuleEngine
from mpopt_hf.engine.step_times import StepTimeLearner

A, B, C = MemoryConfig(8), MemoryConfig(4), MemoryConfig(2)


def test_seen_configurations_take_their_mean_and_the_others_the_machine_ratio():
    learner = StepTimeLearner({A: 1.0, B: 2.0, C: 4.0})
    assert learner.corrected(B) == 2.0  # nothing seen: the prediction
    learner.observe(A, 1.4)
    assert learner.corrected(A) == 1.0  # one sample is not enough
    learner.observe(A, 1.6)
    assert learner.corrected(A) == pytest.approx(1.5)
    assert learner.corrected(B) == pytest.approx(3.0) and learner.corrected(C) == pytest.approx(6.0)
    assert learner.samples[A].se == pytest.approx(0.1)
    learner.observe(B, float("nan"))
    learner.observe(B, -1.0)
    assert B not in learner.samples  # not a time


def test_the_engine_prices_by_what_it_measured_and_keeps_it_across_resume():
    frozen = MemoryConfig(8, freeze_rate=0.5)  # another trainable set: neither dominates the other
    candidates = [Candidate(A, 100, 1.0), Candidate(frozen, 50, 0.5)]
    engine = RuleEngine(candidates, trial_steps=4, search_share=None)
    engine.start(0, 0.5)
    ran = engine.current
    predicted = {c.config: c.step_s for c in candidates}
    engine.observe_step(1, 3 * predicted[ran])
    engine.observe_step(2, 3 * predicted[ran])
    engine.observe_step(3, 100.0, timed=False)  # a step slowed by tracking its memory: not a time sample
    other = frozen if ran == A else A
    assert engine.candidate(ran).step_s == pytest.approx(3 * predicted[ran])
    assert engine.candidate(other).step_s == pytest.approx(3 * predicted[other])  # the machine's ratio
    engine.reopen()  # a re-decision prunes and orders on the learned times
    assert {c.config: c.step_s for c in engine.survivors} == pytest.approx({c: 3 * t for c, t in predicted.items()})
    again = RuleEngine(candidates, trial_steps=4, search_share=None)
    again.load_state_dict(engine.state_dict())
    assert again.candidate(ran).step_s == pytest.approx(3 * predicted[ran])
