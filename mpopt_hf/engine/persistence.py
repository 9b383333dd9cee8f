"""The engine's state as JSON-able data, and reading it back (older saved forms included). The parts that are
dataclasses (`TrialCounts`, `SearchClock`, `RaceState`, `ArmStats`, `Decision`) are saved as their fields through
`codec`; what is written by hand here is only how the parts are laid out."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from ..config import MemoryConfig
from .candidates import Candidate, Decision
from .codec import decode, encode, load_fields
from .scoring import ArmStats
from .step_times import StepTimeLearner

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RuleEngine

_CLOCK_FIELDS = ("elapsed_s", "search_seconds", "last_eval_s")  # saved at the top, as they always were


def engine_state_dict(self: RuleEngine) -> dict[str, Any]:
    """The engine's state as JSON-able data (`RuleEngine.state_dict`)."""
    clock = encode(self.clock)
    return {
        "gain_per": self.gain_per,
        "candidates": [c.to_dict() for c in self.candidates],
        "infeasible": [[c.to_dict(), r, self.marked_under.get(c)] for c, r in self.infeasible.items()],
        "budget_bytes": self.budget_bytes,
        "arms": encode(self.arms),
        "queue": encode(self.queue),
        "current": encode(self.current),
        **encode(self.counts),
        **{name: clock[name] for name in _CLOCK_FIELDS},
        "race": encode(self.race_state),
        "horizon": {"seconds": self.clock.horizon_s, "from": self.clock.horizon_from},
        "decisions": encode(self.decisions),
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
    self.current = decode(MemoryConfig | None, state["current"])
    race = state.get("race") or {}
    # states saved before the counts were one dataclass kept the last metric's error with the race
    load_fields(self.counts, {"last_se": race.get("last_se"), **state})
    load_fields(self.race_state, race)
    horizon = state.get("horizon") or {}
    load_fields(self.clock, {**{k: state[k] for k in _CLOCK_FIELDS if k in state},
                             "horizon_s": horizon.get("seconds"), "horizon_from": horizon.get("from", 0.0)})
    self.survivors = self._prune()
    self.arms = decode(dict[MemoryConfig, ArmStats], state["arms"])
    self.queue = decode(list[MemoryConfig], state["queue"])
    known = {f.name for f in fields(Decision)}
    # each configuration read back through MemoryConfig: a field added since (e.g. lora_rank) gets its default
    self.decisions = [Decision(**{k: (MemoryConfig.from_dict(v).to_dict() if k == "config" else v)
                                  for k, v in d.items() if k in known}) for d in state["decisions"]]
