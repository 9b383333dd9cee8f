"""Where the memory budget comes from, and how it changes while training runs.

On a shared device the memory a run may use is not a constant: another process takes some and gives it back.
`MPOptArguments.memory_budget_mib` is therefore one of

* a number of MiB: fixed;
* ``"auto"``: what this process could hold now, re-read at step boundaries. On CUDA the device's free memory
  (``torch.cuda.mem_get_info``) plus what this process's caching allocator already reserves; on a CPU (Linux) the
  kernel's ``MemAvailable`` plus this process's resident set. The safety margin is applied by the engine;
* a callable returning bytes (Python only): the user's own reading, e.g. a container's cgroup limit, or a
  `BudgetTrace` that replays a recorded budget (how the tests and the CPU recipe simulate a co-located process).

`BudgetReader` reads it (every ``budget_every_steps`` optimizer steps) and reports a change, which the callback
hands to the engine as a budget event at the next step boundary, before any out-of-memory error.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import MIB

AUTO = "auto"
# a change smaller than this share of the budget is noise (allocator rounding, another process's small buffers)
RELATIVE_CHANGE = 0.01


def read_budget_bytes(budget: Any, device: torch.device) -> float | None:
    """The budget now, in bytes: ``budget`` as `MPOptArguments.memory_budget_mib` holds it (None: none given)."""
    if budget is None:
        return None
    if callable(budget):
        value = budget()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"MPOptArguments.memory_budget_mib: the budget callable {budget!r} must return a finite "
                             f"number of bytes > 0, got {value!r}.")
        return float(value)
    if budget == AUTO:
        return auto_budget_bytes(device)
    return float(budget) * MIB


def auto_budget_bytes(device: torch.device) -> float:
    """What this process could hold now on ``device``: free memory plus what it already holds."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device))
    available = _meminfo_bytes("MemAvailable")
    if available is None:
        raise ValueError("MPOptArguments.memory_budget_mib='auto' reads free memory from CUDA, or on a CPU from "
                         "/proc/meminfo, which this system lacks: give a number of MiB or a callable returning bytes.")
    return float(available + _resident_bytes())


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def is_dynamic(budget: Any) -> bool:
    """Whether the budget may change while training runs (``"auto"`` or a callable)."""
    return budget == AUTO or callable(budget)


class BudgetReader:
    """Reads the budget every ``every`` steps and says when it changed by more than `RELATIVE_CHANGE`."""

    def __init__(self, budget: Any, device: torch.device, every: int, last_bytes: float | None = None,
                 last_step: int | None = None) -> None:
        """``last_bytes`` and ``last_step``: the budget already known (e.g. the engine's) and the step it was read at."""
        self.budget, self.device, self.every = budget, device, every
        self.last_bytes = last_bytes
        self.last_step = last_step

    @property
    def dynamic(self) -> bool:
        return is_dynamic(self.budget)

    def initial(self) -> float | None:
        self.last_bytes = read_budget_bytes(self.budget, self.device)
        return self.last_bytes

    def changed(self, step: int, reduce_min: Callable[[float], float] = lambda v: v) -> float | None:
        """The new budget in bytes when it is due to be read at ``step`` and has changed; else None. ``reduce_min``
        makes every rank see the smallest rank's reading, so that all decide alike."""
        if self.last_step is not None and step < self.last_step:
            self.last_step = None  # a new trainer (the online loop's next task) counts its steps from 0 again
        if not self.dynamic or (self.last_step is not None and step - self.last_step < self.every):
            return None
        self.last_step = step
        now = reduce_min(read_budget_bytes(self.budget, self.device))
        if self.last_bytes is not None and abs(now - self.last_bytes) <= RELATIVE_CHANGE * self.last_bytes:
            return None
        self.last_bytes = now
        return now


@dataclass(frozen=True)
class BudgetPoint:
    """From ``at`` (seconds since the trace started) on, the budget is ``mib``."""

    at: float
    mib: float


class BudgetTrace:
    """A recorded budget replayed as a callable returning bytes: ``points`` sorted by time, each holding from its
    time until the next (before the first: the first's). The clock starts at the first call (or `start`).

    ``BudgetTrace.parse("0:512,30:256,60:512")`` is 512 MiB, then 256 MiB from 30 s, then 512 MiB from 60 s."""

    def __init__(self, points: Sequence[BudgetPoint], clock: Callable[[], float] = time.perf_counter) -> None:
        if not points:
            raise ValueError("BudgetTrace needs at least one (seconds, MiB) point.")
        for p in points:
            if not (math.isfinite(p.at) and p.at >= 0 and math.isfinite(p.mib) and p.mib > 0):
                raise ValueError(f"BudgetTrace point {p.at!r}:{p.mib!r} must be seconds >= 0 and MiB > 0.")
        self.points = sorted(points, key=lambda p: p.at)
        self.clock = clock
        self.started: float | None = None

    @classmethod
    def parse(cls, text: str, clock: Callable[[], float] = time.perf_counter) -> "BudgetTrace":
        points = []
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            try:
                at, mib = part.split(":")
                points.append(BudgetPoint(float(at), float(mib)))
            except ValueError:
                raise ValueError(f"Cannot read {part!r} in the budget trace {text!r}: expected 'seconds:MiB' points "
                                 "separated by commas, e.g. '0:512,30:256,60:512'.") from None
        return cls(points, clock)

    def start(self) -> None:
        self.started = self.clock()

    def replayed_on(self, clock: Callable[[], float]) -> "BudgetTrace":
        """The same points on another clock (e.g. a stream's steps), started at its zero; this trace is untouched."""
        trace = BudgetTrace(self.points, clock)
        trace.started = 0.0
        return trace

    def elapsed(self) -> float:
        if self.started is None:
            self.start()
        return self.clock() - self.started

    def mib_at(self, seconds: float) -> float:
        current = self.points[0].mib
        for point in self.points:
            if point.at <= seconds:
                current = point.mib
        return current

    def __call__(self) -> float:
        return self.mib_at(self.elapsed()) * MIB

    def __repr__(self) -> str:
        return "BudgetTrace(" + ",".join(f"{p.at:g}:{p.mib:g}" for p in self.points) + ")"


__all__ = ["AUTO", "BudgetPoint", "BudgetReader", "BudgetTrace", "auto_budget_bytes", "is_dynamic", "read_budget_bytes"]
