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
