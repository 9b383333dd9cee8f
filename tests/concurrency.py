"""Run test workers in separate processes at the same time (spawned: no state shared with the test)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence


def run_concurrently(target: Callable, args_per_process: Sequence[tuple], timeout: float = 60) -> list[int | None]:
    """Start one process per argument tuple, all before any is joined; their exit codes, in order."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_per_process]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    return [p.exitcode for p in procs]
