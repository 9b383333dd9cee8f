"""Small helpers of the engine shell: attributes that live on one of its parts, and sizes as people read them."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from ..config import MIB

T = TypeVar("T")


def mib_text(value: float | None) -> str:
    return "none" if value is None else f"{value / MIB:.1f} MiB"


class forwarded(Generic[T]):
    """An engine attribute that lives on one of its parts (``part``, under ``name``): callers and saved states
    still see one engine with the attributes it always had."""

    def __init__(self, part: str, name: str | None = None) -> None:
        self.part, self.name = part, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, objtype: type | None = None) -> T:
        if obj is None:
            return self  # type: ignore[return-value]
        return getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: Any, value: T) -> None:
        setattr(getattr(obj, self.part), self.name, value)
