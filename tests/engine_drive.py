"""One scripted run of the engine through its events, the same on any version that has `RuleEngine.step`: the saved
state fixtures (tests/data/engine_state_*.json) were made by it, and test_engine_state replays it on today's code."""

from __future__ import annotations

from mpopt_hf.config import MemoryConfig
from mpopt_hf.engine import Candidate, RuleEngine
from mpopt_hf.engine.events import Metric, Start, StepBegin, StepDone

FULL, HALF, HEAD = MemoryConfig(8), MemoryConfig(8, freeze_rate=0.5), MemoryConfig(8, freeze_rate=1.0)


def fresh(strategy: str) -> RuleEngine:
    candidates = [Candidate(FULL, 40.0, 0.2), Candidate(HALF, 30.0, 0.1), Candidate(HEAD, 20.0, 0.05)]
    return RuleEngine(candidates, trial_steps=2, search_share=None, strategy=strategy, budget_bytes=100.0)


def drive(engine: RuleEngine, steps: range) -> None:
    """Steps of 0.1 s; each metric the engine asks for is a deterministic function of the step and configuration."""
    for step in steps:
        engine.step(StepBegin(step=step))
        if engine.step(StepDone(step=step, seconds=0.1, peak_bytes=10.0)):
            value = 0.2 + 0.01 * step * (1.0 - engine.current.freeze_rate / 2)
            engine.step(Metric(step=step, value=value, se=0.01, eval_s=0.05))


def start(engine: RuleEngine) -> None:
    engine.step(Start(step=0, metric=0.2, se=0.01, eval_s=0.05))
