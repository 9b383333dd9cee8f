"""The command line both card scripts share: run (or ``--quick``), ``--from_results``, ``--check``, ``--output_dir``.

    run            measure, write results.json and README.md (the card) into --output_dir, print the table
                   (--quick's default folder ends in _quick: a CI-size run never overwrites the real card)
    --from_results re-render the card from a results.json (written next to it, or into --output_dir if given)
    --check CARD   compare the table with CARD's; exit 1 naming each row and column that differ. With a fresh run it
                   writes nothing unless --output_dir is given (never over the card it checks)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .card import CARD_NAME, RESULTS_NAME, TableSpec, check_card, render_table


@dataclass(frozen=True)
class CardScript:
    """What one card plugs into `main`."""

    script: str  # the path a user runs, for the recorded command
    description: str
    default_output_dir: str
    spec: TableSpec
    add_arguments: Callable[[argparse.ArgumentParser], None]  # the card's own flags
    run: Callable[[argparse.Namespace], dict[str, Any]]  # measure; returns the results dict
    records: Callable[[dict[str, Any]], list[dict[str, Any]]]  # the table's records of a results dict
    card: Callable[[dict[str, Any]], Any]  # the ModelCard of a results dict


def parser_for(script: CardScript) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=script.description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, a tiny batch, 1 step (CI size)")
    parser.add_argument("--from_results", metavar="PATH", help="re-render the card from this results.json; measure nothing")
    parser.add_argument("--check", metavar="CARD.md", help="compare the table with this card's; exit 1 naming the rows "
                        "that differ (memory to 1 decimal MiB, ratios to one unit of their last digit, times not compared)")
    parser.add_argument("--output_dir", default=None, help=f"where results.json and {CARD_NAME} go "
                        f"(default {script.default_output_dir}; with --quick {script.default_output_dir}_quick)")
    script.add_arguments(parser)
    return parser


def _output_dir(script: CardScript, args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path | None:
    """Where this invocation writes, or None (a check of a fresh run without --output_dir writes nothing)."""
    if args.from_results is not None:
        out = Path(args.output_dir) if args.output_dir else Path(args.from_results).parent
        return None if args.check and not args.output_dir else out
    if args.check and not args.output_dir:
        return None
    out = Path(args.output_dir or script.default_output_dir + ("_quick" if args.quick else ""))
    if args.check and (out / CARD_NAME).resolve() == Path(args.check).resolve():
        parser.error(f"--output_dir {out} would overwrite the card --check {args.check} compares against")
    return out


def write(results: dict[str, Any], script: CardScript, out: Path, read_from: str | None = None) -> Path:
    """Write results.json (unless it was read from there) and the card into ``out``; the card's path."""
    out.mkdir(parents=True, exist_ok=True)
    if read_from is None or Path(read_from).resolve() != (out / RESULTS_NAME).resolve():
        (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    path = out / CARD_NAME
    path.write_text(str(script.card(results)), encoding="utf-8")
    return path


def _without_check(argv: Sequence[str]) -> list[str]:
    """The command line that reproduces the run: ``argv`` without ``--check CARD`` (it measures nothing)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--check":
            skip = True
        elif not arg.startswith("--check="):
            out.append(arg)
    return out


def main(script: CardScript, argv: Sequence[str] | None = None) -> int:
    """Run the card's script; 0 unless ``--check`` found a difference."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser_for(script)
    args = parser.parse_args(argv)
    if args.check is not None and not Path(args.check).is_file():
        parser.error(f"--check {args.check}: no such card file")
    if args.from_results is not None:
        if args.quick:
            parser.error("--quick runs the measurements small; --from_results reads finished ones: give one")
        if not Path(args.from_results).is_file():
            parser.error(f"--from_results {args.from_results}: no such results file")
    out = _output_dir(script, args, parser)
    if args.from_results is not None:
        results = json.loads(Path(args.from_results).read_text(encoding="utf-8"))
    else:
        start = time.perf_counter()
        results = script.run(args)
        results["run_seconds"] = time.perf_counter() - start
        results["command"] = shlex.join(["python", script.script, *_without_check(argv)])
    print(render_table(script.spec, script.records(results)))
    if out is not None:
        print(f"card: {write(results, script, out, args.from_results)}")
    if args.check is None:
        return 0
    differences = check_card(script.spec, script.records(results), args.check)
    for line in differences:
        print(f"{args.check}: {line}")
    print(f"{args.check}: {'differs from' if differences else 'agrees with'} the results "
          f"({len(script.records(results))} rows; memory to 1 decimal MiB, ratios to one unit of their last digit, times not compared)")
    return 1 if differences else 0
