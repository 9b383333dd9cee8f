"""What the online loop sees at every step of the stream: the configuration that ran, the budget that held, the
peak predicted for it and, where a step was measured, its peak; and the engine's decisions per task.

The loop counts the stream's steps (`StreamSteps`), which is also the clock a `BudgetTrace` replayed over the
stream reads, so a trace given in steps lands on the same steps on every machine.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..config import MIB, MemoryConfig


class StreamSteps:
    """The optimizer steps (Trainer steps) run so far over the whole stream; callable, as a trace's clock."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> float:
        return float(self.count)


class StepLog:
    """Records each step of one task: its configuration (also each distinct one, in order), budget and peaks."""

    def __init__(self, task: str, steps: StreamSteps, budget_mib: Any, engine: Any = None) -> None:
        self.task, self.steps, self.budget_mib, self.engine = task, steps, budget_mib, engine
        self.used: list[MemoryConfig] = []
        self.rows: list[dict[str, Any]] = []
        self.step_budget: float | None = None  # the budget the running step started under (read at its begin)

    def budget_now(self) -> float | None:
        """The budget in MiB that holds now (a trace's value at this stream step, or the fixed budget)."""
        budget = self.budget_mib
        if callable(budget):
            return budget() / MIB
        return budget

    def callback(self, trainer: Any) -> Any:
        from transformers import TrainerCallback

        log = self

        class _Watch(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                log.step_budget = log.budget_now()  # read before the step moves the stream's clock

            def on_step_end(self, args, state, control, **kwargs):
                config = trainer.memory_config
                if not log.used or log.used[-1] != config:
                    log.used.append(config)
                log.add(config, log.step_budget, trainer.step_peak_bytes)

        return _Watch()

    def add(self, config: MemoryConfig, budget_mib: float | None, measured_bytes: float | None) -> None:
        self.steps.count += 1
        engine = self.engine() if callable(self.engine) else self.engine
        predicted = None if engine is None else engine.candidate(config).peak_bytes
        self.rows.append({
            "stream_step": self.steps.count, "task": self.task, "config": config.short(),
            "budget_mib": budget_mib,
            "predicted_peak_mib": None if predicted is None else predicted / MIB,
            "measured_peak_mib": None if measured_bytes is None else measured_bytes / MIB,
        })


def task_decisions(decisions: list[Any]) -> list[dict[str, Any]]:
    """The engine's decisions of one task as a record holds them: step, kind, outcome, configuration, reason."""
    return [{"step": d.step, "kind": d.kind, "outcome": d.outcome, "config": MemoryConfig.from_dict(d.config).short(),
             "reason": d.reason,
             "budget_mib": None if d.budget_bytes is None else d.budget_bytes / MIB} for d in decisions]


def why_label(decisions: list[dict[str, Any]]) -> str:
    """A compact account of why configurations changed in a task, e.g. ``task, trial x3, budget x2``."""
    counts = Counter(d["kind"] for d in decisions)
    return ", ".join(k if n == 1 else f"{k} x{n}" for k, n in counts.items()) or "-"


__all__ = ["StepLog", "StreamSteps", "task_decisions", "why_label"]
