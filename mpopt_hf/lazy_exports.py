"""Names a package re-exports from submodules loaded on first use.

The trainer, the callback and the online loop pull in transformers' Trainer, which is slow to import; a package
that offers them loads them only when one is asked for, so importing `mpopt_hf.config` or a light submodule of a
package costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``names[name]`` (a module path) on first use."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
