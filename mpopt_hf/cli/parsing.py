"""Between argparse and the argument dataclasses: a subcommand whose flags `transformers.HfArgumentParser` builds.

``mpopt``'s subparsers are HfArgumentParsers (`build_parser` sets that), so a subcommand hands its dataclass to
`add_dataclass_command` and gets one flag per field, with the field's ``metadata`` (help, metavar) and default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from collections.abc import Callable
from typing import Any


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of a dataclass-built parser: each flag by its dashed spelling (HfArgumentParser also accepts the
    field's own, ``--batch_size``), a list flag by one metavar (the description says how to list), a bool flag as
    one that may take true or false, and the default unless it is None or False, whose meaning the help text says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if "_" not in s] or action.option_strings
        return super()._format_action_invocation(shown)

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.nargs == "+":
            return self._metavar_formatter(action, default_metavar)(1)[0]
        if action.nargs == "?" and action.const is True:  # HfArgumentParser's bool: --json, or --json false
            return "[true|false]"
        return super()._format_args(action, default_metavar)


def add_dataclass_command(subparsers: Any, name: str, arguments: type, handler: Callable[[argparse.Namespace], int],
                          flag_types: dict[str, Callable[[str], Any]], **kwargs: Any) -> argparse.ArgumentParser:
    """The subcommand ``name`` with one flag per field of the dataclass ``arguments``.

    HfArgumentParser types a flag by its field's annotation; ``flag_types`` (field name -> argparse ``type``) gives
    flags their own readers instead, so that a refusal names the flag and quotes the text as it was typed."""
    parser = subparsers.add_parser(name, dataclass_types=arguments, formatter_class=HelpFormatter, **kwargs)
    for action in parser._actions:  # argparse has no public accessor for a parser's actions
        action.option_strings.sort(key=lambda option: "_" in option)  # the dashed spelling first: usage and errors
        if action.dest in flag_types:
            action.type = flag_types[action.dest]
    parser.set_defaults(handler=handler)
    return parser


def dataclass_from(arguments: type, namespace: argparse.Namespace) -> Any:
    """An instance of the dataclass ``arguments`` from a parsed namespace: its ``__post_init__`` checks run here."""
    return arguments(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(arguments) if f.init})
