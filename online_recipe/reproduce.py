"""The command line of ``reproduce/*.py``: run a recipe (its offline default, or with ``--quick`` a CI-size variant)
or read a finished run's ``results.json``, print the per-task table, write the model card and check a card against
the run.

Apart from :mod:`online_recipe.model_card` because that module says what a card holds and this one is a command
line: its flags, how they combine with the recipe's and what it refuses.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from pathlib import Path

from mpopt_hf.report import stream_metric

from .model_card import CARD_NAME, RECIPES, check_card, render_table, write_card


def _script(module: str, parser: argparse.ArgumentParser) -> str:
    """The reproduce script of recipe ``module`` (what a refusal names), else the running program's name."""
    return RECIPES[module][1] if module in RECIPES else parser.prog


def _parser(description: str | None, quick_flags: Sequence[str] | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog="Other flags go to the recipe.",
                                     allow_abbrev=False)  # an abbreviation must never swallow a recipe flag
    parser.add_argument("--from_results", metavar="PATH", help="Read this results.json instead of running the recipe.")
    parser.add_argument("--check", metavar="CARD.md", help="Compare the table against this card's; exit 1 naming "
                        "the rows that differ (the metric to 3 decimals, seconds not compared). Writes no card.")
    parser.add_argument("--card", metavar="PATH", help="Write the regenerated card here (default with "
                        "--from_results: README.md next to the results; a fresh run writes it into its output_dir).")
    quick = ("this script has none" if quick_flags is None else
             "the recipe's flags " + " ".join(quick_flags).replace("%", "%%") + "; recipe flags given with it "
             "override them")
    parser.add_argument("--quick", action="store_true", help=f"Run the recipe small (seconds, CI size): {quick}.")
    return parser


def reproduce_main(module: str, argv: Sequence[str] | None = None, description: str | None = None,
                   quick_flags: Sequence[str] | None = None) -> int:
    """A reproduce script: run the recipe ``module`` (any flag this parser does not know goes to the recipe; with
    ``--quick``, after ``quick_flags``, so it overrides them) or read ``--from_results``, print the table, write the
    card, and with ``--check`` compare it; 0 when it agrees, 1 when it differs. ``quick_flags`` None: the recipe
    has no quick run and ``--quick`` is refused."""
    parser = _parser(description, quick_flags)
    args, recipe_flags = parser.parse_known_args(argv)
    if args.quick:  # before the file checks: a --quick --from_results PATH is wrong whether PATH exists or not
        if quick_flags is None:
            parser.error(f"--quick: {_script(module, parser)} has no quick run ({module} defines no QUICK_FLAGS); "
                         "run it without --quick, with the recipe flags that make it small.")
        if args.from_results is not None:
            parser.error("--quick runs the recipe small; --from_results reads a finished run: give one of them.")
        recipe_flags = [*quick_flags, *recipe_flags]  # argparse keeps a flag's last value: the user's win
    if args.check is not None and not Path(args.check).is_file():
        parser.error(f"--check {args.check}: no such card file.")
    if args.from_results is not None:
        if recipe_flags:
            parser.error(f"--from_results reads a finished run; the recipe flags {recipe_flags} have no effect.")
        if not Path(args.from_results).is_file():
            parser.error(f"--from_results {args.from_results}: no such results file.")
        results = json.loads(Path(args.from_results).read_text(encoding="utf-8"))
    else:
        results = importlib.import_module(module).main(recipe_flags)
    print(render_table(results["tasks"], bool(results["summary"].get("random_weights"))))
    card_path = args.card or (None if args.check or args.from_results is None
                              else Path(args.from_results).parent / CARD_NAME)
    if card_path is not None:
        print(f"card: {write_card(results, card_path)}")
    if args.check is None:
        return 0
    differences = check_card(results, args.check)
    metric = stream_metric(results["tasks"]).metric
    for line in differences:
        print(f"{args.check}: {line}")
    print(f"{args.check}: {'differs from' if differences else 'agrees with'} the run "
          f"({len(results['tasks'])} tasks; {metric} to 3 decimals, seconds not compared)")
    return 1 if differences else 0
