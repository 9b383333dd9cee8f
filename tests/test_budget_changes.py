"""A memory budget that changes while training runs: the engine re-plans at the next step boundary from the
predicted peaks (a budget event), before any out-of-memory error; a budget that grows back lets faster
configurations in again. On numbers alone, then through MPOptTrainer with a replayed budget trace."""

from __future__ import annotations

import json
import os

import pytest

from dist_fakes import FakeCost, StepClock
from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer
from mpopt_hf.budget import BudgetReader, BudgetTrace, read_budget_bytes
from mpopt_hf.engine import MIB, Candidate, RuleEngine, enumerate_configs
from mpopt_hf.engine.candidates import DecisionKind, Outcome
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, training_args

COST = FakeCost(base_mib=10.0, per_sample_mib=8.0)  # mb8/f0: 74 MiB, mb4: 42, mb2: 26, mb1: 18


def _engine(budget_mib: float, strategy: str = "ucb") -> RuleEngine:
    configs = enumerate_configs([8, 4, 2, 1], [0.0], [0], ["fp32"], n_blocks=4)
    return RuleEngine([Candidate(c, *COST.predict(c)) for c in configs], budget_bytes=budget_mib * MIB, margin=0.0,
                      strategy=strategy, trial_steps=2)


def test_a_lower_budget_moves_off_what_no_longer_fits_and_a_higher_one_lets_it_back():
    engine = _engine(80)
    assert engine.start(0, 0.0) == MemoryConfig(8)  # the fastest fits 80 MiB
    chosen = engine.set_budget(3, 30 * MIB)
    assert chosen == MemoryConfig(2)  # 26 MiB: the fastest under 30 (mb4 needs 42)
    assert {c.config for c in engine.survivors} == {MemoryConfig(2)}  # dominance: one per trainable set
    last = engine.decisions[-1]
    assert last.kind == DecisionKind.BUDGET.value and last.budget_bytes == 30 * MIB and last.step == 3
    assert engine.set_budget(5, 29 * MIB) == MemoryConfig(2)  # still fits: no switch, but the change is recorded
    assert engine.decisions[-1].kind == "budget" and MemoryConfig.from_dict(engine.decisions[-1].config) == MemoryConfig(2)
    assert engine.set_budget(9, 80 * MIB) == MemoryConfig(8)  # the faster one fits again: searched, chosen
    last = engine.decisions[-1]  # the search re-opened: ucb measures each survivor again, the fastest first
    assert (last.kind, last.outcome, last.budget_bytes) == ("budget", Outcome.MEASURE, 80 * MIB)
    assert not engine.infeasible  # no mark was made: the configurations were not too large, the budget was small


def test_marks_made_under_a_smaller_budget_are_lifted_when_it_grows():
    engine = _engine(80)
    engine.start(0, 0.0)
    engine.set_budget(1, 45 * MIB)  # mb4 (42 MiB) fits
    assert engine.current == MemoryConfig(4)
    assert engine.observe_step(2, 1.0, peak_bytes=46 * MIB) is False  # measured over the budget: marked
    assert MemoryConfig(4) in engine.infeasible and engine.current == MemoryConfig(2)
    assert engine.decisions[-1].kind == DecisionKind.OVER_BUDGET.value
    engine.set_budget(3, 100 * MIB)
    assert MemoryConfig(4) not in engine.infeasible  # marked under 45 MiB; 100 MiB may hold it
    oom = engine.on_oom(4, engine.current)
    assert engine.decisions[-1].kind == DecisionKind.OOM.value and oom != engine.decisions[0].config


def test_a_budget_below_every_candidate_runs_the_smallest_instead_of_stopping():
    engine = _engine(80, strategy="race")
    engine.start(0, 0.0)
    assert engine.set_budget(2, 5 * MIB) == MemoryConfig(1)  # 18 MiB > 5 MiB, the smallest there is
    assert engine.below_minimum and engine.decisions[-1].kind == DecisionKind.BUDGET
    assert MemoryConfig.from_dict(engine.decisions[-1].config) == MemoryConfig(1)
    engine.observe_step(3, 1.0, peak_bytes=18 * MIB)  # over the budget, but nothing smaller exists: no mark
    assert not engine.infeasible and engine.current == MemoryConfig(1)
    with pytest.raises(ValueError, match="minimum feasible peak"):
        _engine(5)  # before training, the same budget is the user's error, named


def test_the_state_keeps_the_budget_and_the_budget_each_mark_was_made_under():
    engine = _engine(45)
    engine.start(0, 0.0)
    engine.observe_step(1, 1.0, peak_bytes=50 * MIB)
    restored = _engine(45)
    restored.load_state_dict(json.loads(json.dumps(engine.state_dict())))
    assert restored.budget_bytes == 45 * MIB and restored.marked_under == {MemoryConfig(4): 45 * MIB}


def test_budget_sources():
    assert read_budget_bytes(256.0, None) == 256 * MIB
    assert read_budget_bytes(lambda: 3 * MIB, None) == 3 * MIB
    with pytest.raises(ValueError, match="must return a finite number of bytes > 0, got -1"):
        read_budget_bytes(lambda: -1, None)
    now = [0.0]
    trace = BudgetTrace.parse("0:100,10:50,20:100", clock=lambda: now[0])
    readings = []
    for t in (0, 5, 10, 15, 25):
        now[0] = t
        readings.append(trace() / MIB)
    assert readings == [100, 100, 50, 50, 100]
    with pytest.raises(ValueError, match="expected 'seconds:MiB' points"):
        BudgetTrace.parse("0=100")
    reader = BudgetReader(trace, None, every=3)
    now[0] = 0
    reader.initial()
    now[0] = 12
    assert reader.changed(1) == 50 * MIB
    now[0] = 25
    assert reader.changed(2) is None  # read at most every 3 steps: 100 MiB again is seen at step 4
    assert reader.changed(4) == 100 * MIB


def test_args_accept_auto_a_callable_and_numbers_from_flags():
    assert MPOptArguments(memory_budget_mib="512").memory_budget_mib == 512.0
    assert MPOptArguments(memory_budget_mib="auto").memory_budget_mib == "auto"
    fn = lambda: MIB  # noqa: E731
    assert MPOptArguments(memory_budget_mib=fn).memory_budget_mib is fn
    with pytest.raises(ValueError, match="budget_every_steps must be an int >= 1, got 0"):
        MPOptArguments(budget_every_steps=0)


def test_the_trainer_follows_a_replayed_budget_trace(tmp_path):
    """A co-located process takes memory at step 4 and gives it back at step 8 (a trace on the step clock):
    the engine switches down before the step that would not fit, and back up after; no out-of-memory error,
    no step lost, every decision's kind and budget recorded."""
    model = build_tiny("vit", dropout=0.0)
    data = ListDataset(example_batch(model, 8 * 12))
    steps = {"n": 0}
    trace = {0: 80, 4: 30, 8: 80}  # MiB from that step on

    def budget() -> float:
        at = max(s for s in trace if s <= steps["n"])
        return trace[at] * MIB

    mpopt = MPOptArguments(memory_budget_mib=budget, budget_every_steps=1, micro_batch_sizes=[8, 4, 2],
                           freeze_rates=[0.0], checkpoint_segments=[0], safety_margin=0.0, strategy="ucb",
                           trial_steps=1, search_share=None)
    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, 8, steps=12), train_dataset=data,
                           eval_dataset=ListDataset(example_batch(model, 8)), mpopt_args=mpopt, cost_model=COST,
                           clock=StepClock())
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps["n"] = state.global_step

    trainer.add_callback(StepCounter())
    used: list[tuple[int, MemoryConfig]] = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            used.append((state.global_step, trainer.memory_config))

    trainer.add_callback(Watch())
    trainer.train()
    assert trainer.state.global_step == 12 and not trainer.oom_events
    for step, config in used:  # the configuration each step ran fits the budget that held at its start
        budget_mib = trace[max(s for s in trace if s <= step - 1)]
        assert COST.peak(config) <= budget_mib * MIB, (step, config.short(), budget_mib)
    assert any(c.micro_batch_size == 8 for s, c in used if s > 9)  # the faster one is back after the budget returned
    decisions = json.load(open(os.path.join(tmp_path, "decisions.json")))
    budget_decisions = [d for d in decisions if d["kind"] == "budget"]
    assert [round(d["budget_bytes"] / MIB) for d in budget_decisions] == [30, 80]
    assert [d["step"] for d in budget_decisions] == [4, 8]


def test_a_race_without_room_for_its_copies_beside_the_fastest_races_smaller_siblings():
    """The fastest of each trainable set leaves no room for the race's two host copies: the race compares smaller
    configurations of the same sets that do, and its winner goes on at the fastest of its set (same learning)."""
    configs = enumerate_configs([8, 4], [0.0, 0.5], [0], ["fp32"], n_blocks=4)
    engine = RuleEngine([Candidate(c, *COST.predict(c)) for c in configs], budget_bytes=80 * MIB, margin=0.0,
                        strategy="race", trial_steps=1, late_gain=False, copy_bytes=10 * MIB)
    # fastest per set: mb8/f0 (74 MiB), mb8/f0.5 (42 MiB); with 2 x 10 MiB of copies only mb4/f0 (42) and mb8/f0.5 fit
    first = engine.start(0, 0.0)
    assert engine.racing and engine.decisions[-1].outcome == Outcome.RACE_ROOM
    raced = {first, *engine.race_state.queue}
    assert raced == {MemoryConfig(4), MemoryConfig(8, freeze_rate=0.5)}
    assert engine.observe_step(1, 1.0) is True
    other = engine.observe_metric(1, 0.9 if first == MemoryConfig(4) else 0.1)
    assert engine.observe_step(2, 1.0) is True
    chosen = engine.observe_metric(2, 0.1 if other == MemoryConfig(8, freeze_rate=0.5) else 0.9)
    assert chosen == MemoryConfig(8)  # mb4/f0 won; it goes on as mb8/f0, its set's fastest, once the copies are gone
    assert engine.decisions[-1].outcome == Outcome.RACE_WON and engine.race_incumbent == MemoryConfig(4)
    assert MemoryConfig.from_dict(engine.decisions[-1].config) == MemoryConfig(8)


def test_under_ucb_a_survivor_the_budget_brings_in_is_due_a_measurement():
    """A lower budget can make a slower configuration of a set its survivor: it has no estimate, so ucb measures it."""
    configs = enumerate_configs([8, 4], [0.0, 0.5], [0], ["fp32"], n_blocks=4)
    engine = RuleEngine([Candidate(c, *COST.predict(c)) for c in configs], budget_bytes=80 * MIB, margin=0.0,
                        strategy="ucb", trial_steps=1)
    assert {c.config for c in engine.survivors} == {MemoryConfig(8), MemoryConfig(8, freeze_rate=0.5)}
    engine.start(0, 0.0)
    for step in (1, 2):  # both survivors measured once: nothing is due
        engine.observe_step(step, 1.0)
        engine.observe_metric(step, 0.1 * step)
    assert engine.queue == []
    engine.set_budget(3, 50 * MIB)  # mb8/f0 (74 MiB) no longer fits: mb4/f0 (42) is its set's survivor now
    assert MemoryConfig(4) in {c.config for c in engine.survivors}
    assert MemoryConfig(4) in engine.queue or engine.current == MemoryConfig(4)
    assert MemoryConfig(8) not in engine.queue and MemoryConfig(8) not in engine.arms
