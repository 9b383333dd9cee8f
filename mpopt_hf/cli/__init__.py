"""The ``mpopt`` command. Subcommands register themselves in `SUBCOMMANDS`; ``profile`` is the first.

Each subcommand's arguments are a dataclass (`ProfileArguments` for ``profile``) whose flags
`transformers.HfArgumentParser` builds, so they can also be read from a JSON file or built in Python.
Bad input exits with `EXIT_BAD_INPUT` and a one-line message naming the flag and the value.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .arguments import (
    EXIT_BAD_INPUT,
    EXIT_BUDGET_TOO_SMALL,
    ProfileArguments,
    UsageError,
    device_arg,
    parse_input_shape,
)
from .models import TINY_FAMILIES, accepted_models, load_model, synthetic_batch
from .profile import add_profile_parser, cmd_profile, run_profile

__all__ = [
    "EXIT_BAD_INPUT", "EXIT_BUDGET_TOO_SMALL", "SUBCOMMANDS", "TINY_FAMILIES", "ProfileArguments", "UsageError",
    "accepted_models", "build_parser", "cmd_profile", "device_arg", "load_model", "main", "parse_input_shape",
    "run_profile", "synthetic_batch",
]

# name -> function adding the subparser (an HfArgumentParser; a handler(namespace) in its defaults);
# other subcommands add themselves here
SUBCOMMANDS: dict[str, Callable[[Any], None]] = {"profile": add_profile_parser}


def build_parser() -> argparse.ArgumentParser:
    from transformers import (
        HfArgumentParser,  # here, not at import: importing transformers takes a second
    )

    parser = argparse.ArgumentParser(prog="mpopt", description="Memory-aware online retraining tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=HfArgumentParser)
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ValueError as err:  # UsageError, and the checks of the argument dataclasses built from the flags
        print(f"mpopt {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
