"""The engine's state as JSON-able data, and reading it back (older saved forms included)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ..config import MemoryConfig
from .candidates import Candidate, Decision, config_or_none, dict_or_none
from .scoring import ArmStats
from .step_times import StepTimeLearner

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RuleEngine


def engine_state_dict(self: RuleEngine) -> dict[str, Any]:
    """The engine's state as JSON-able data (`RuleEngine.state_dict`)."""
    return {
        "gain_per": self.gain_per,
        "candidates": [c.to_dict() for c in self.candidates],
        "infeasible": [[c.to_dict(), r, self.marked_under.get(c)] for c, r in self.infeasible.items()],
        "budget_bytes": self.budget_bytes,
        "arms": [[c.to_dict(), asdict(s)] for c, s in self.arms.items()],
        "queue": [c.to_dict() for c in self.queue],
        "current": dict_or_none(self.current),
        "baseline": self.baseline,
        "last_metric": self.last_metric,
        "trial_seconds": self.trial_seconds,
        "trial_steps_done": self.trial_steps_done,
        "elapsed_s": self.elapsed_s,
        "last_retune_step": self.last_retune_step,
        "last_peak": self.last_peak,
        "search_seconds": self.search_seconds,
        "last_eval_s": self.last_eval_s,
        "race": self.race_state.to_dict(self.last_se),
        "horizon": {"seconds": self.horizon_s, "from": self.horizon_from},
        "decisions": [d.to_dict() for d in self.decisions],
        "step_times": self.step_times.state_dict(),
    }

def load_engine_state(self: RuleEngine, state: dict[str, Any]) -> None:
    """Read back `engine_state_dict`'s form, older states included (`RuleEngine.load_state_dict`)."""
    saved_unit = state.get("gain_per", "second")  # states saved before the field were per second
    if saved_unit != self.gain_per:
        raise ValueError(f"The saved engine state counts gains per {saved_unit}, this engine per {self.gain_per} "
                         f"(MPOptArguments.gain_per): resume with gain_per={saved_unit!r}, or start a fresh search.")
    self.candidates = [Candidate.from_dict(c) for c in state["candidates"]]
    marks = [(MemoryConfig.from_dict(m[0]), m[1], m[2] if len(m) > 2 else None) for m in state["infeasible"]]
    self.infeasible = {c: r for c, r, _ in marks}
    self.marked_under = {c: b for c, _, b in marks}
    self.budget_bytes = state.get("budget_bytes", self.budget_bytes)
    self.step_times = StepTimeLearner({c.config: c.step_s for c in self.candidates})
    if "step_times" in state:  # saved before step times were learned: they are learned afresh
        self.step_times.load_state_dict(state["step_times"])
    self.survivors = self._prune()
    self.arms = {MemoryConfig.from_dict(c): ArmStats(**s) for c, s in state["arms"]}
    self.queue = [MemoryConfig.from_dict(c) for c in state["queue"]]
    self.current = config_or_none(state["current"])
    for name in ("baseline", "last_metric", "trial_seconds", "trial_steps_done", "elapsed_s", "last_retune_step", "last_peak"):
        setattr(self, name, state[name])
    self.search_seconds, self.last_eval_s = state.get("search_seconds", 0.0), state.get("last_eval_s")
    race = state.get("race")
    if race is not None:
        self.race_state.load(race)
        self.last_se = race["last_se"]
    horizon = state.get("horizon") or {}
    self.horizon_s, self.horizon_from = horizon.get("seconds"), horizon.get("from", 0.0)
    self.decisions = [Decision(**d) for d in state["decisions"]]
