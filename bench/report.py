"""How every benchmark ends: its markdown (table, reading, raw JSON) printed and written to ``bench/results``."""

from __future__ import annotations

import json
import os
from typing import Any


def write_report(lines: list[str], raw: Any, out_dir: str, name: str) -> str:
    """Print ``lines`` followed by ``raw`` as JSON, write the same to ``out_dir/name``; returns the path."""
    text = "\n".join([*lines, "", "Raw figures:", "", "```json", json.dumps(raw, indent=1), "```"]) + "\n"
    print(text, end="")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def mean_interval(values: list[float]) -> str:
    """``mean ± half-width`` of the 95 % confidence interval of the mean (Student's t), as the benchmarks print it."""
    import statistics

    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:.3f} ± {half:.3f}"
