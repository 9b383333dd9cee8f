"""The project's own `evaluate` metric modules, shipped with the package so nothing is fetched from the hub.

Load them by path: ``evaluate.load(metric_path("accuracy"))``.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRICS = ("accuracy", "mce")


def metric_path(name: str) -> str:
    """The path of a shipped metric's script, for ``evaluate.load``."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; shipped metrics: {list(METRICS)}.")
    return str(METRICS_DIR / name / f"{name}.py")


def load_metric(name: str):
    """``evaluate.load`` of a shipped metric, by path (never the hub)."""
    import evaluate

    return evaluate.load(metric_path(name))
