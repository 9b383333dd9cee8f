"""The engine's dataclasses as JSON-able data and back, driven by their type hints, so that a state's saved form
is its fields (``asdict`` with configurations as dicts) and no field list is written twice by hand.

Configurations are saved as `MemoryConfig.to_dict`; a dict keyed by configurations as ``[[key, value], ...]``
(JSON keys are strings; int and float keys are read back as numbers); a tuple or a set as a list. Reading back, a
field missing from the data keeps its default, so that a state saved before the field existed still loads; a type
hint the codec cannot read back (a union of several types, say) raises TypeError rather than guess.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from typing import Any, TypeVar, Union

from ..config import MemoryConfig

T = TypeVar("T")


def encode(value: Any) -> Any:
    """``value`` as JSON-able data."""
    if isinstance(value, MemoryConfig):
        return value.to_dict()
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        if any(isinstance(k, MemoryConfig) for k in value):
            return [[encode(k), encode(v)] for k, v in value.items()]
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [encode(v) for v in sorted(value, key=repr)]
    return value


def decode(hint: Any, data: Any) -> Any:
    """``data`` (as `encode` wrote it) read back as a value of the type ``hint``."""
    if data is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        concrete = [a for a in args if a is not type(None)]
        if len(concrete) != 1:
            raise TypeError(f"codec.decode cannot tell which of {hint} saved {data!r}.")
        return decode(concrete[0], data)
    if hint is MemoryConfig:
        return MemoryConfig.from_dict(data)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint(data)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return load_fields(hint(**_required(hint, data)), data)
    if origin is dict:
        key, value = args
        pairs = data if isinstance(data, list) else data.items()
        read_key = key if key in (int, float) else (lambda k: decode(key, k))  # JSON made number keys strings
        return {read_key(k): decode(value, v) for k, v in pairs}
    if origin in (list, set, frozenset):
        return origin(decode(args[0], v) for v in data)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in data)
        return tuple(decode(a, v) for a, v in zip(args, data, strict=True))
    return data


def load_fields(instance: T, data: dict[str, Any]) -> T:
    """Set ``instance``'s fields from ``data`` (`encode`'s form of it); fields missing there keep their value."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):  # type: ignore[arg-type]
        if f.name in data:
            object.__setattr__(instance, f.name, decode(hints[f.name], data[f.name]))
    return instance


def _required(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The arguments ``cls`` cannot be built without (fields with no default), read from ``data``."""
    hints = typing.get_type_hints(cls)
    return {f.name: decode(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
