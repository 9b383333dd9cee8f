"""Configuration as dataclasses: one point of the knob space (`MemoryConfig`, in `memory`), how the engine chooses
(`MPOptArguments`, in `arguments`), the input checks they and the CLI and recipes share (`validation`), and the one
`MIB` that turns bytes into what a person reads."""

from __future__ import annotations

from .arguments import (
    COST_PREDICTORS,
    DEFAULT_SAFETY_MARGIN,
    DEFAULT_SEARCH_SHARE,
    GAIN_METRICS,
    GAIN_UNITS,
    LR_SCALINGS,
    STRATEGIES,
    MPOptArguments,
)
from .memory import (
    CHECKPOINT_POLICIES,
    OPTIMIZER_STATES,
    PRECISIONS,
    MemoryConfig,
    check_budget,
)
from .validation import (
    InvalidTypeError,
    check_bool,
    check_choice,
    check_int,
    check_list,
    check_number,
    check_str,
    is_int,
    is_number,
)

MIB = 2**20  # bytes in code, MiB in what a person reads

__all__ = [
    "DEFAULT_SAFETY_MARGIN",
    "CHECKPOINT_POLICIES",
    "COST_PREDICTORS",
    "DEFAULT_SEARCH_SHARE",
    "GAIN_METRICS",
    "GAIN_UNITS",
    "LR_SCALINGS",
    "MIB",
    "OPTIMIZER_STATES",
    "PRECISIONS",
    "STRATEGIES",
    "InvalidTypeError",
    "MPOptArguments",
    "MemoryConfig",
    "check_bool",
    "check_budget",
    "check_choice",
    "check_int",
    "check_list",
    "check_number",
    "check_str",
    "is_int",
    "is_number",
]
