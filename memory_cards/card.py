"""Render a card's table from its results, parse it back out of a card, and name the rows that differ.

A card's numbers are never typed: the table is rendered from ``results.json`` by the column functions of its
`TableSpec`, and `check_card` renders it again and compares it with the card's, cell by cell. Memory is compared to
1 decimal MiB, memory ratios to one unit of their last digit, times not at all (they depend on the machine and its load).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
RESULTS_NAME = "results.json"
COMPARISONS = ("exact", "mib", "ratio", "none")


@dataclass(frozen=True)
class Column:
    """One column: its header, the cell it renders from a record, and how `diff_tables` compares it."""

    header: str
    cell: Callable[[dict[str, Any]], str]
    compare: str = "exact"  # one of COMPARISONS
    numeric: bool = True  # right-aligned

    def __post_init__(self) -> None:
        if self.compare not in COMPARISONS:
            raise ValueError(f"Column {self.header!r}: compare must be one of {COMPARISONS}, got {self.compare!r}")


@dataclass(frozen=True)
class TableSpec:
    """A card's table: its columns, and the headers whose cells name a row (the row's key)."""

    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def headers(self) -> list[str]:
        return [c.header for c in self.columns]


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def table_rows(spec: TableSpec, records: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [{c.header: c.cell(r) for c in spec.columns} for r in records]


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"


def render_table(spec: TableSpec, records: Sequence[dict[str, Any]]) -> str:
    """The markdown table of ``records`` (numbers right-aligned)."""
    align = ["---:" if c.numeric else "---" for c in spec.columns]
    rows = table_rows(spec, records)
    return "\n".join([_line(spec.headers), _line(align), *(_line(list(r.values())) for r in rows)])


def _cells(line: str) -> list[str]:
    return [c.strip().replace(r"\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def parse_table(spec: TableSpec, markdown: str) -> list[dict[str, str]]:
    """The rows of the first table in ``markdown`` whose header is ``spec``'s."""
    lines = markdown.splitlines()
    start = next((i for i, text in enumerate(lines) if text.startswith("|") and _cells(text) == spec.headers), None)
    if start is None:
        raise ValueError(f"no table with the columns {spec.headers} in the card")
    rows = []
    for text in lines[start + 2:]:
        if not text.startswith("|"):
            break
        values = _cells(text)
        if len(values) != len(spec.headers):
            raise ValueError(f"a row of the card's table has {len(values)} cells, expected {len(spec.headers)}: {text!r}")
        rows.append(dict(zip(spec.headers, values)))
    return rows


def _same(compare: str, a: str, b: str) -> bool:
    if compare == "none":
        return True
    if compare in ("mib", "ratio") and a != b:
        try:
            x, y = float(a), float(b)
        except ValueError:
            return False
        if compare == "mib":
            return round(x, 1) == round(y, 1)
        decimals = max(len(a.partition(".")[2]), len(b.partition(".")[2]))
        return abs(x - y) <= 1.0001 * 10.0 ** -decimals  # one unit of the last digit shown: a rounding edge
    return a == b


def diff_tables(spec: TableSpec, expected: Sequence[dict[str, str]], found: Sequence[dict[str, str]]) -> list[str]:
    """One line per row and column that differ between a fresh rendering (``expected``) and a card (``found``)."""
    def key(row: dict[str, str]) -> str:
        return " / ".join(row[h] for h in spec.key)

    run, card = {key(r): r for r in expected}, {key(r): r for r in found}
    out = [f"row {k!r}: in the run, missing from the card" for k in run if k not in card]
    out += [f"row {k!r}: in the card, not in the run" for k in card if k not in run]
    for k in (k for k in run if k in card):
        for column in spec.columns:
            a, b = run[k][column.header], card[k][column.header]
            if not _same(column.compare, a, b):
                out.append(f"row {k!r}: {column.header} is {b} in the card, {a} in the run")
    return out


def check_card(spec: TableSpec, records: Sequence[dict[str, Any]], card_path: str | Path) -> list[str]:
    """The differences between the table ``records`` render and the card at ``card_path`` (empty: they agree)."""
    from huggingface_hub import ModelCard

    # ModelCard(text), never ModelCard.load: a path that does not exist would be taken for a hub id
    card = ModelCard(Path(card_path).read_text(encoding="utf-8"))
    return diff_tables(spec, table_rows(spec, records), parse_table(spec, card.text))


def environment_lines(env: dict[str, Any] | None) -> str:
    """The machine, as a card states it."""
    if not env:
        return "Not recorded."
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "transformers", "huggingface_hub") if k in env)
    if env.get("gpu"):
        processor = f"GPU {env['gpu']}"
    else:
        processor = f"CPU {env.get('cpu')} (ISA used by PyTorch's kernels: {env.get('cpu_isa')})"
    threads = env.get("torch_threads")
    return "\n".join([
        f"- {versions}",
        f"- device `{env.get('device')}`: {processor}; {threads} torch thread{'' if threads == 1 else 's'}, "
        f"OMP_NUM_THREADS={env.get('omp_num_threads')}",
        f"- {env.get('platform')}",
    ])


def build_card(*, name: str, tags: Sequence[str], evals: list[Any], sections: Sequence[str]):
    """A `huggingface_hub.ModelCard`: front matter (library, tags, a model-index of ``evals``) and a markdown body."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", tags=list(tags), model_name=name, eval_results=evals or None)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join([f"# {name}", *sections]) + "\n")


def peak_eval(model: str, what: str, value_mib: float, dataset: str):
    """One model-index entry: a measured peak in MiB of ``model`` under ``what``."""
    from huggingface_hub import EvalResult

    return EvalResult(task_type="memory-measurement", dataset_type="random-inputs", dataset_name=dataset,
                      metric_type="peak_memory_mib", metric_name=f"{model}: {what}", metric_value=round(value_mib, 1))
