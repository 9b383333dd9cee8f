"""What an online run records: one `TaskRecord` per task, the stream's `OnlineResult` and its summary.

Kept apart from the loop (`mpopt_hf.online`) so a report or a model card reads records without the trainer. A
record names its metric and direction; accuracy's values also sit under the keys results always had
(``accuracy_before``/``accuracy_after``, ``mean_accuracy_*``), so files written before the metric hook read alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..metrics import load_metric

ACCURACY = "accuracy"  # the default metric; its values are also kept under the keys results always had


@dataclass
class TaskRecord:
    """What happened on one task; sizes in MiB, times in seconds.

    ``metric_before``/``metric_after`` are the task's scores in ``metric`` (``higher_is_better`` says which way is
    better); for accuracy ``accuracy_before``/``accuracy_after`` are the same values (None for another metric). A
    record made the old way, ``TaskRecord(name, accuracy_before, accuracy_after)``, is an accuracy record."""

    task: str
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    configs: list[dict[str, Any]] = field(default_factory=list)
    measured_peak_mib: float | None = None
    measured_peak_source: str | None = None
    predicted_peak_mib: float | None = None
    budget_mib: float | None = None
    seconds: float = 0.0
    search_seconds: float = 0.0
    train_samples: int = 0
    steps: int = 0
    corruption: str | None = None
    severity: int | None = None
    metric: str = ACCURACY
    higher_is_better: bool = True
    metric_before: float | None = None
    metric_after: float | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)  # the engine's, in this task (kind, config, why)
    budget_min_mib: float | None = None  # the lowest budget that held during the task (a budget trace)

    def __post_init__(self) -> None:
        if self.metric == ACCURACY:
            for when in ("before", "after"):
                old, new = getattr(self, f"accuracy_{when}"), getattr(self, f"metric_{when}")
                if old is not None and new is not None and old != new:
                    raise ValueError(f"TaskRecord {self.task!r}: accuracy_{when} {old!r} and metric_{when} {new!r} "
                                     "are the same accuracy; give one.")
                setattr(self, f"metric_{when}", old if new is None else new)
                setattr(self, f"accuracy_{when}", new if old is None else old)
        elif self.accuracy_before is not None or self.accuracy_after is not None:
            raise ValueError(f"TaskRecord {self.task!r}: metric {self.metric!r} keeps its values in metric_before/"
                             "metric_after; accuracy_before/accuracy_after are for metric 'accuracy'.")

    def set_scores(self, before: float | None = None, after: float | None = None) -> None:
        """Set the metric's value before and/or after retraining (and the accuracy keys for accuracy)."""
        for when, value in (("before", before), ("after", after)):
            if value is None:
                continue
            setattr(self, f"metric_{when}", value)
            if self.metric == ACCURACY:
                setattr(self, f"accuracy_{when}", value)


@dataclass
class OnlineResult:
    tasks: list[TaskRecord]
    summary: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)  # one row per stream step (`online.timeline`)

    def to_dict(self) -> dict[str, Any]:
        result = {"tasks": [asdict(t) for t in self.tasks], "summary": self.summary}
        if self.timeline:
            result["timeline"] = self.timeline
        return result


# ---------------------------------------------------------------------------- summary


def summarise(records: Sequence[TaskRecord], baseline: str, budget_mib: float | None, n_tasks: int,
              seconds: float, reference_errors: dict[str, float] | None = None) -> dict[str, Any]:
    """Means over tasks, the budget check and, for accuracy, mCE of the adapted model against the model before each
    task. ``mean_gain`` is the mean improvement in the metric's own direction (positive: retraining helped), e.g.
    perplexity before minus after."""
    n = len(records)
    metrics = {(r.metric, r.higher_is_better) for r in records}
    if len(metrics) != 1:
        raise ValueError(f"The records of one stream must share one metric and direction, got {sorted(metrics)}.")
    (metric, higher), = metrics
    measured = [r.measured_peak_mib for r in records if r.measured_peak_mib is not None]
    before = sum(r.metric_before for r in records) / n
    after = sum(r.metric_after for r in records) / n
    summary: dict[str, Any] = {
        "baseline": baseline,
        "tasks_done": n,
        "tasks_planned": n_tasks,
        "complete": n == n_tasks,
        "metric": metric,
        "higher_is_better": higher,
        "mean_metric_before": before,
        "mean_metric_after": after,
        "mean_accuracy_before": before if metric == ACCURACY else None,
        "mean_accuracy_after": after if metric == ACCURACY else None,
        "budget_mib": budget_mib,
        "max_measured_peak_mib": max(measured) if measured else None,
        "within_budget": None if not measured or budget_mib is None else max(measured) <= budget_mib,
        "seconds": seconds,
        "train_seconds": sum(r.seconds for r in records),
        "search_seconds": sum(r.search_seconds for r in records),
    }
    summary["mean_gain"] = after - before if higher else before - after
    if metric != ACCURACY:
        summary["mce"] = None
        summary["mce_reference"] = f"undefined: mCE compares error rates (1 - accuracy); the metric is {metric!r}"
        return summary
    names = [r.corruption or r.task for r in records]
    errors = [1.0 - r.accuracy_after for r in records]
    base = [reference_errors[name] for name in names] if reference_errors else [1.0 - r.accuracy_before for r in records]
    try:
        result = load_metric("mce").compute(predictions=errors, references=base, corruptions=names)
        summary["mce"] = result["mce"]
        summary["mce_reference"] = "reference_errors" if reference_errors else "accuracy_before"
    except ValueError as error:  # e.g. a reference with no error at all on a corruption
        summary["mce"] = None
        summary["mce_reference"] = f"undefined: {error}"
    return summary
