"""The engine's state is its dataclasses' fields: saved through `codec`, read back whole, older forms included;
its decisions say what was chosen as an `Outcome`; and a strategy changes the engine only through its methods."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from mpopt_hf.config import MemoryConfig
from mpopt_hf.engine import Candidate, Outcome, RuleEngine
from mpopt_hf.engine.candidates import RaceTrial
from mpopt_hf.engine.codec import decode, encode, load_fields
from mpopt_hf.engine.events import Metric, Start, StepBegin, StepDone
from mpopt_hf.engine.strategies import RaceState

FULL, HALF = MemoryConfig(8), MemoryConfig(8, freeze_rate=0.5)
STRATEGIES = Path(__file__).resolve().parents[1] / "mpopt_hf" / "engine" / "strategies"


def _raced_engine() -> RuleEngine:
    """An engine one trial into a race, with a half-way metric, a recorded trial and a copy operation due."""
    engine = RuleEngine([Candidate(FULL, 40.0, 0.2), Candidate(HALF, 30.0, 0.1)], trial_steps=2, search_share=None)
    engine.step(Start(step=0, metric=0.1, se=0.02, eval_s=0.5))
    for step, metric in ((1, 0.2), (2, 0.3)):
        if engine.step(StepDone(step=step, seconds=0.2)):
            engine.step(Metric(step=step, value=metric, se=0.02, eval_s=0.5))
    return engine


def test_a_race_state_is_its_fields_and_reads_back_equal():
    state = RaceState(queue=[HALF], racing=True, trials={FULL: RaceTrial(0.5, 0.3, 0.4, 0.02, 0.6)}, saved=FULL,
                      mid=(0.2, 0.2), incumbent=HALF, streak=2, horizon_s=12.5)
    data = json.loads(json.dumps(encode(state)))
    assert data["trials"] == [[FULL.to_dict(), {"gain": 0.5, "metric": 0.3, "seconds": 0.4, "se": 0.02,
                                                "projected": 0.6}]]
    assert decode(RaceState, data) == state  # the tuple, the configurations and the trials come back as they were
    older = {k: v for k, v in data.items() if k not in ("horizon_s", "trial_steps", "horizon_steps")}
    assert load_fields(RaceState(), {**older, "no_longer_a_field": 1}).horizon_s is None  # missing: the default


def test_the_engine_state_round_trips_and_the_race_goes_on_the_same():
    engine = _raced_engine()
    assert engine.racing and engine.race_trials and engine.last_se == 0.02
    state = json.loads(json.dumps(engine.state_dict()))
    restored = RuleEngine([Candidate(FULL, 40.0, 0.2), Candidate(HALF, 30.0, 0.1)], trial_steps=2, search_share=None)
    restored.load_state_dict(state)
    assert restored.state_dict() == engine.state_dict()
    for e in (engine, restored):  # both finish the race alike: the second trial lasts the first's 0.4 s
        for step in range(3, 7):
            e.step(StepBegin(step=step))
            if e.step(StepDone(step=step, seconds=0.1)):
                e.step(Metric(step=step, value=0.2 + 0.05 * step, se=0.02, eval_s=0.5))
    assert [d.outcome for d in restored.decisions] == [d.outcome for d in engine.decisions]
    assert restored.decisions[-1].outcome == Outcome.RACE_WON and restored.current == engine.current


def test_a_state_saved_before_the_counts_and_outcomes_loads():
    """Before this form: the last metric's error was saved with the race, decisions had no outcome."""
    engine = _raced_engine()
    old = json.loads(json.dumps(engine.state_dict()))
    old["race"]["last_se"] = old.pop("last_se")
    for d in old["decisions"]:
        del d["outcome"]
    restored = RuleEngine([Candidate(FULL, 40.0, 0.2), Candidate(HALF, 30.0, 0.1)], trial_steps=2, search_share=None)
    restored.load_state_dict(old)
    assert restored.last_se == 0.02 and restored.race_state == engine.race_state
    assert {d.outcome for d in restored.decisions} == {Outcome.UNRECORDED}


def test_every_decision_has_an_outcome_and_a_kind():
    engine = _raced_engine()
    assert [(d.kind, d.outcome) for d in engine.decisions] == [("start", Outcome.RACE_TRIAL),
                                                              ("trial", Outcome.RACE_TRIAL)]
    with pytest.raises(ValueError):
        Outcome("race won")  # prose is not an outcome


def _assigned_attributes(path: Path) -> list[str]:
    """``x.y = ...`` targets in ``path`` whose object is not ``self`` or a name bound to the strategy's own state."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, ast.Attribute):
                    owner = ast.unparse(t.value)
                    if owner not in ("self", "s", "self.state"):
                        found.append(f"{path.name}:{t.lineno}: {ast.unparse(t)}")
    return found


def test_strategies_change_the_engine_only_through_its_methods():
    assert [p.name for p in STRATEGIES.glob("*.py")]  # the folder is where this test thinks
    for path in STRATEGIES.glob("*.py"):
        assert _assigned_attributes(path) == [], path
