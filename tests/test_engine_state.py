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

import engine_drive

FULL, HALF = MemoryConfig(8), MemoryConfig(8, freeze_rate=0.5)
STRATEGIES = Path(__file__).resolve().parents[1] / "mpopt_hf" / "engine" / "strategies"
DATA = Path(__file__).resolve().parent / "data"


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


@pytest.mark.parametrize("strategy", ["race", "ucb"])
def test_a_state_saved_by_the_previous_form_loads_and_goes_on_as_todays(strategy):
    """tests/data/engine_state_74faf08_*.json: saved by the engine at 74faf08 (the last metric's error with the race,
    decisions without outcomes) after `engine_drive`'s first 5 steps. Loaded today, it is the state today's engine
    reaches on the same events, and both go on alike."""
    old = json.loads((DATA / f"engine_state_74faf08_{strategy}.json").read_text())
    assert "last_se" not in old and all("outcome" not in d for d in old["decisions"])  # the older form indeed
    restored, today = engine_drive.fresh(strategy), engine_drive.fresh(strategy)
    restored.load_state_dict(old)
    engine_drive.start(today)
    engine_drive.drive(today, range(1, 6))

    def comparable(engine):
        state = engine.state_dict()
        for d in state["decisions"]:
            d.pop("wall_time"), d.pop("outcome")
        return state

    assert comparable(restored) == comparable(today)
    assert {d.outcome for d in restored.decisions} == {Outcome.UNRECORDED}
    for engine in (restored, today):
        engine_drive.drive(engine, range(6, 30))
    assert [(d.step, d.config, d.outcome) for d in restored.decisions[3:]] == [
        (d.step, d.config, d.outcome) for d in today.decisions[3:]]
    if strategy == "race":
        assert Outcome.RACE_WON in {d.outcome for d in today.decisions}


def test_every_decision_has_an_outcome_and_a_kind():
    engine = _raced_engine()
    assert [(d.kind, d.outcome) for d in engine.decisions] == [("start", Outcome.RACE_TRIAL),
                                                              ("trial", Outcome.RACE_TRIAL)]
    with pytest.raises(ValueError):
        Outcome("race won")  # prose is not an outcome


MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault", "add", "discard",
            "popitem", "sort", "reverse"}


def _changes_to_others(path: Path) -> list[str]:
    """What ``path`` changes on an object that is not its own: ``x.y = ...``, ``x.y[k] = ...`` and ``x.y.append(...)``
    (and the other mutators) where ``x`` is not ``self`` or the strategy's own state (``s``, ``self.state``)."""
    own = ("self", "s", "self.state")
    found = []

    def foreign(node: ast.AST) -> bool:  # an attribute of something not our own, or a part of one
        while isinstance(node, ast.Subscript):
            node = node.value
        return isinstance(node, ast.Attribute) and ast.unparse(node.value) not in own

    for node in ast.walk(ast.parse(path.read_text())):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if foreign(t):
                    found.append(f"{path.name}:{t.lineno}: {ast.unparse(t)} = ...")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            if foreign(node.func.value):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_strategies_change_the_engine_only_through_its_methods(tmp_path):
    paths = list(STRATEGIES.glob("*.py"))
    assert len(paths) >= 4  # the folder is where this test thinks
    for path in paths:
        assert _changes_to_others(path) == [], path
    probe = tmp_path / "probe.py"  # the detector on known cases: the engine's three, not the strategy's own two
    probe.write_text("e.queue.remove(c)\ne.arms[c] = 1\ne.survivors = []\ns.queue.pop(0)\nself.state.ops.append(1)\n")
    assert [line.split(": ", 1)[1] for line in _changes_to_others(probe)] == [
        "e.arms[c] = ...", "e.survivors = ...", "e.queue.remove(c)"]
