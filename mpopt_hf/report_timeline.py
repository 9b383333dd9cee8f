"""The memory timeline of an online run: every step's budget, the peak predicted for the configuration it ran
and the measured peaks, over the whole stream, with the task boundaries and the engine's decisions marked, above
the metric per task. What a person looks at to see the engine react to a budget that moves."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from .report import stream_metric, task_scores

KIND_MARKERS = {"budget": ("v", "red"), "oom": ("X", "black"), "over_budget": ("X", "purple"), "trial": (".", "grey"),
                "task": ("|", "green"), "drift": ("*", "orange"), "start": ("o", "green")}


def timeline_png(timeline: Sequence[dict[str, Any]], tasks: Sequence[dict[str, Any]], title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["stream_step"] for r in timeline]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), constrained_layout=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    budget = [r["budget_mib"] for r in timeline]
    if any(b is not None for b in budget):
        top.step(steps, budget, where="pre", color="red", label="budget")
    predicted = [r["predicted_peak_mib"] for r in timeline]
    if any(v is not None for v in predicted):
        top.step(steps, predicted, where="pre", color="tab:blue", alpha=0.8, label="predicted peak of the configuration run")
    measured = [(r["stream_step"], r["measured_peak_mib"]) for r in timeline if r["measured_peak_mib"] is not None]
    if measured:
        top.plot(*zip(*measured), "o", color="tab:blue", markersize=4, label="measured step peak")
    starts = {}
    for r in timeline:
        starts.setdefault(r["task"], r["stream_step"])
    for name, step in starts.items():
        top.axvline(step - 0.5, color="grey", lw=0.6, ls=":")
        top.annotate(name, (step, 0), xycoords=("data", "axes fraction"), fontsize="x-small", rotation=90,
                     va="bottom", ha="left")
    offsets = {t["task"]: starts.get(t["task"], 1) - 1 for t in tasks}
    values = [v for v in budget + predicted if v is not None] + [v for _, v in measured]
    ceiling = 1.1 * max(values) if values else 1.0
    for task in tasks:
        for d in task.get("decisions") or []:
            marker, colour = KIND_MARKERS.get(d["kind"], ("+", "black"))
            at = offsets.get(task["task"], 0) + d["step"]  # each task's trainer counts its steps from 0
            top.plot([at], [ceiling * 0.97], marker, color=colour, markersize=6)
    for kind in sorted({d["kind"] for t in tasks for d in t.get("decisions") or []}):
        marker, colour = KIND_MARKERS.get(kind, ("+", "black"))
        top.plot([], [], marker, color=colour, label=f"decision: {kind}")
    top.set_ylim(0, ceiling)
    top.set_xlabel("step of the stream")
    top.set_ylabel("MiB")
    top.set_title("memory against the budget" + (f" | {title}" if title else ""))
    top.legend(loc="lower left", fontsize="x-small", ncol=2)

    metric = stream_metric(tasks)
    scores = [task_scores(t) for t in tasks]
    x = list(range(len(tasks)))
    bottom.bar([i - 0.2 for i in x], [s.before for s in scores], 0.4, label="before")
    bottom.bar([i + 0.2 for i in x], [s.after for s in scores], 0.4, label="after")
    bottom.set_xticks(x, [t["task"] for t in tasks], rotation=15, ha="right", fontsize="small")
    bottom.set_ylabel(f"{metric.metric}")
    bottom.set_title(f"{metric.metric} per task ({metric.direction})")
    bottom.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
