"""Input checks shared by the dataclasses of `mpopt_hf.config`, the ``mpopt`` CLI and the recipes.

Every message names the field (``where``), the value and what is allowed. A bool is not a number, a str is not a
number, a scalar is not a list; NaN and inf are refused wherever a number is expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any


class InvalidTypeError(TypeError, ValueError):
    """A value of the wrong type. A `TypeError`, and a `ValueError` too, so that callers that catch the
    validation errors of a configuration (``except ValueError``) also catch it."""


def described(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(where: str, value: Any, ok: Callable[[int], bool], allowed: str, optional: bool = False) -> int | None:
    """``value`` as an int if it is an integer (not a bool) for which ``ok`` holds; ``allowed`` says what is."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidTypeError(f"{where} must be {allowed}, got {described(value)}.")
    if not ok(int(value)):
        raise ValueError(f"{where} must be {allowed}, got {value!r}.")
    return int(value)


def check_number(where: str, value: Any, ok: Callable[[float], bool], allowed: str,
                 optional: bool = False) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool, not a str) for which ``ok`` holds."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(f"{where} must be {allowed}, got {described(value)}.")
    number = float(value)
    if not math.isfinite(number) or not ok(number):
        raise ValueError(f"{where} must be {allowed}, got {value!r}.")
    return number


def check_choice(where: str, value: Any, choices: tuple[str, ...] | list[str], optional: bool = False) -> str | None:
    """``value`` if it is one of the strings ``choices``."""
    if value is None and optional:
        return None
    allowed = f"one of {list(choices)}" + (" or None" if optional else "")
    if not isinstance(value, str):
        raise InvalidTypeError(f"{where} must be {allowed}, got {described(value)}.")
    if value not in choices:
        raise ValueError(f"{where} must be {allowed}, got {value!r}.")
    return value


def check_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidTypeError(f"{where} must be True or False, got {described(value)}.")
    return value


def check_str(where: str, value: Any, allowed: str, optional: bool = False) -> str | None:
    """``value`` if it is a non-empty str (or None when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidTypeError(f"{where} must be {allowed}, got {described(value)}.")
    if not value.strip():
        raise ValueError(f"{where} must be {allowed}, got {value!r} (empty).")
    return value


def check_list(where: str, values: Any, ok: Callable[[Any], bool], allowed: str, optional: bool = False) -> list | None:
    """``values`` as a list if it is a non-empty list or tuple whose every item passes ``ok``."""
    if values is None and optional:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise InvalidTypeError(
            f"{where} must be a list of {allowed}{' or None' if optional else ''}, got {described(values)}"
            + (f": write [{values!r}] for a single value." if not isinstance(values, (set, frozenset, dict)) else ".")
        )
    if len(values) == 0:
        default = ", or None for the default." if optional else "."
        raise ValueError(f"{where} is empty: give at least one of {allowed}{default}")
    bad = [v for v in values if not ok(v)]
    if bad:
        note = "" if not any(isinstance(v, bool) for v in bad) else " (True/False are bools, not numbers)"
        raise ValueError(f"{where} holds {bad}; allowed: {allowed}{note}.")
    return list(values)


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


