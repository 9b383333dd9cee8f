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


def _bench():
    """bench/budget_real_size.py, which reports the step-time error after online correction (not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    if "budget_real_size" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "bench" / "budget_real_size.py"
        spec = importlib.util.spec_from_file_location("budget_real_size", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["budget_real_size"]


def test_the_benchmark_corrects_each_configuration_from_the_others_only():
    """The "after" error prices a configuration as the engine would before running it: its prediction times the
    median ratio of the *other* configurations; its own steps must not leak in."""
    bench = _bench()
    learner = StepTimeLearner({A: 1.0, B: 2.0, C: 4.0})
    for config, seconds in ((A, 2.0), (A, 2.0), (B, 6.0), (B, 6.0), (C, 10.0), (C, 10.0)):
        learner.observe(config, seconds)  # measured / predicted: A 2, B 3, C 2.5
    assert bench.held_out_estimate(learner, A) == pytest.approx(1.0 * 2.75)  # median of B's 3 and C's 2.5
    assert bench.held_out_estimate(learner, B) == pytest.approx(2.0 * 2.25)
    errors = bench.step_time_errors(learner)
    rows = {r["config"]: r for r in errors["per_config"]}
    assert rows[A.short()]["before"] == pytest.approx(0.5) and rows[A.short()]["after"] == pytest.approx(0.375)
    assert rows[C.short()]["after"] == pytest.approx(abs(4.0 * 2.5 / 10.0 - 1))  # A's 2 and B's 3
    assert errors["before"] == pytest.approx(0.6) and errors["after"] == pytest.approx(0.25)
    alone = StepTimeLearner({A: 1.0, B: 2.0})
    alone.observe(A, 2.0)
    alone.observe(A, 2.0)
    assert bench.held_out_estimate(alone, A) is None  # no other configuration ran: nothing to correct from
    assert bench.step_time_errors(alone)["after"] is None
