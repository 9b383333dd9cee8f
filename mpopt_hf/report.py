"""Results of an online run as files a person reads: JSON, CSV, a plot, a printed table.

Every file is written to a temporary name in the same folder and renamed into
place, so a crash never leaves a half-written file under a result's name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

TABLE_COLUMNS = ("task", "metric", "metric_before", "metric_after", "measured_peak_mib", "predicted_peak_mib",
                 "budget_mib", "seconds", "configs")
SHORT_NAMES = {"accuracy": "acc"}  # column headers of the terminal table


class Scores(NamedTuple):
    """A metric's name, its direction and its values before and after retraining."""

    metric: str
    higher_is_better: bool
    before: float | None
    after: float | None

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


def task_scores(task: dict[str, Any]) -> Scores:
    """The metric of a task record (a ``results.json`` row); a record written before the metric hook is accuracy."""
    if "metric_before" in task:
        return Scores(task.get("metric", "accuracy"), task.get("higher_is_better", True), task["metric_before"],
                      task["metric_after"])
    return Scores("accuracy", True, task["accuracy_before"], task["accuracy_after"])


def summary_scores(summary: dict[str, Any]) -> Scores:
    """The stream's mean metric before and after, from a summary (an old one: ``mean_accuracy_*``)."""
    if "mean_metric_before" in summary:
        return Scores(summary.get("metric", "accuracy"), summary.get("higher_is_better", True),
                      summary["mean_metric_before"], summary["mean_metric_after"])
    return Scores("accuracy", True, summary["mean_accuracy_before"], summary["mean_accuracy_after"])


def stream_metric(tasks: Sequence[dict[str, Any]]) -> Scores:
    """The metric the records of one stream share (values None); accuracy for no records."""
    found = {task_scores(t)[:2] for t in tasks} or {("accuracy", True)}
    if len(found) != 1:
        raise ValueError(f"The records of one stream must share one metric and direction, got {sorted(found)}.")
    (metric, higher), = found
    return Scores(metric, higher, None, None)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _configs_label(configs: Sequence[dict[str, Any]]) -> str:
    from .config import MemoryConfig

    return " -> ".join(MemoryConfig.from_dict(c).short() for c in configs) or "-"


def results_csv(tasks: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = list(tasks[0]) if tasks else list(TABLE_COLUMNS)
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for task in tasks:
        writer.writerow({**task, "configs": _configs_label(task.get("configs", []))})
    return buffer.getvalue()


def plot_png(tasks: Sequence[dict[str, Any]], title: str = "") -> bytes:
    """Two panels: the metric before/after per task (grouped bars); peak memory per task against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t["task"] for t in tasks]
    x = list(range(len(tasks)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(tasks) + 2), 7), constrained_layout=True)
    width = 0.38
    metric = stream_metric(tasks)
    scores = [task_scores(t) for t in tasks]
    top.bar([i - width / 2 for i in x], [s.before for s in scores], width, label="before retraining")
    top.bar([i + width / 2 for i in x], [s.after for s in scores], width, label="after retraining")
    top.set_ylabel(f"{metric.metric} ({metric.direction})")
    finite = [v for s in scores for v in (s.before, s.after) if v is not None and abs(v) != float("inf")]
    top.set_ylim(0, 1.15 if metric.metric == "accuracy" else 1.15 * max(finite, default=1.0))
    top.set_xticks(x, names, rotation=20, ha="right")
    top.legend(loc="upper left", ncol=2, fontsize="small")
    top.set_title(f"{metric.metric} per task ({metric.direction})" + (f" | {title}" if title else ""))

    measured = [t.get("measured_peak_mib") for t in tasks]
    predicted = [t.get("predicted_peak_mib") for t in tasks]
    budgets = [t.get("budget_mib") for t in tasks]
    if any(v is not None for v in measured):
        bottom.plot([i for i, v in zip(x, measured) if v is not None], [v for v in measured if v is not None],
                    "o-", label="measured peak")
    if any(v is not None for v in predicted):
        bottom.plot([i for i, v in zip(x, predicted) if v is not None], [v for v in predicted if v is not None],
                    "s--", label="predicted peak", alpha=0.7)
    if any(b is not None for b in budgets):
        bottom.step([i for i, b in zip(x, budgets) if b is not None], [b for b in budgets if b is not None],
                    where="mid", color="red", label="budget")
    if all(v is None for v in measured + predicted + budgets):
        bottom.text(0.5, 0.5, "no memory figures (no retraining)", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_xticks(x, names, rotation=20, ha="right")
    bottom.set_xlim(-0.6, len(tasks) - 0.4)
    values = [v for v in measured + predicted + budgets if v is not None]
    bottom.set_ylim(0, 1.15 * max(values) if values else 1)
    bottom.set_ylabel("peak memory of a training step (MiB)")
    bottom.set_title("peak memory against the budget")
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_results(results: dict[str, Any], output_dir: str | Path, plot: bool = True) -> dict[str, str]:
    """``results.json``, ``results.csv`` and (with ``plot``) ``results.png`` under ``output_dir``; returns the paths."""
    output_dir = Path(output_dir)
    paths = {
        "json": atomic_write_bytes(output_dir / "results.json", json.dumps(results, indent=2).encode()),
        "csv": atomic_write_bytes(output_dir / "results.csv", results_csv(results["tasks"]).encode()),
    }
    if plot:
        title = f"baseline: {results.get('summary', {}).get('baseline', '?')}"
        paths["png"] = atomic_write_bytes(output_dir / "results.png", plot_png(results["tasks"], title))
        if results.get("timeline"):
            from .report_timeline import timeline_png

            paths["timeline"] = atomic_write_bytes(output_dir / "timeline.png",
                                                   timeline_png(results["timeline"], results["tasks"], title))
    return {k: str(v) for k, v in paths.items()}


def format_table(tasks: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of the per-task figures, for the terminal."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    metric = stream_metric(tasks)
    name = SHORT_NAMES.get(metric.metric, metric.metric)
    from .online.timeline import why_label

    header = ("task", f"{name} before", f"{name} after", "peak MiB", "pred MiB", "budget MiB", "train s", "configs")
    traced = any(t.get("budget_min_mib") is not None and t.get("budget_min_mib") != t.get("budget_mib") for t in tasks)
    decided = any(t.get("decisions") for t in tasks)
    rows = [
        (t["task"], cell(task_scores(t).before), cell(task_scores(t).after), cell(t.get("measured_peak_mib")),
         cell(t.get("predicted_peak_mib")),
         cell(t.get("budget_min_mib") if traced else t.get("budget_mib")), cell(t.get("seconds")),
         _configs_label(t.get("configs", [])))
        + ((why_label(t.get("decisions") or []),) if decided else ())
        for t in tasks
    ]
    if traced:
        header = header[:5] + ("min budget MiB",) + header[6:]
    if decided:
        header = header + ("why (decision kinds)",)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if metric.metric != "accuracy" or not metric.higher_is_better:
        lines.append(f"({metric.metric}: {metric.direction})")
    return "\n".join(lines)
