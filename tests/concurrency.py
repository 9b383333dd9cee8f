"""Run test workers in separate processes at the same time (spawned: no state shared with the test)."""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
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


def _rounds_worker(target: Callable, args: tuple, rounds: int, barrier, results, barrier_timeout: float) -> None:
    for r in range(rounds):
        barrier.wait(barrier_timeout)  # every worker leaves the barrier together: the race is on at each round
        try:
            target(r, *args)
            results.put((r, args, None))
        except BaseException as err:  # noqa: BLE001 - reported to the test, which fails on it
            results.put((r, args, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def run_rounds_behind_barrier(target: Callable, args_per_process: Sequence[tuple], rounds: int,
                              timeout: float = 120, barrier_timeout: float = 60) -> list[list[str]]:
    """``target(round, *args)`` in one spawned process per argument tuple, ``rounds`` times, every round
    started by all processes at once behind a Barrier. The processes are started once (a spawn imports the
    test's modules, which is slow), so that a round costs only what the target does.

    Returns, per round, the failures (one line of text each, with the worker's args and traceback); a worker
    that died or hung counts as failing every round it did not report."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(args_per_process))
    results = ctx.Queue()
    procs = [ctx.Process(target=_rounds_worker, args=(target, args, rounds, barrier, results, barrier_timeout))
             for args in args_per_process]
    for p in procs:
        p.start()
    failures: list[list[str]] = [[] for _ in range(rounds)]
    reported: set[tuple[int, str]] = set()
    expected = rounds * len(procs)
    try:
        while len(reported) < expected:
            try:
                r, args, error = results.get(timeout=timeout)
            except queue.Empty:
                break
            reported.add((r, repr(args)))
            if error is not None:
                failures[r].append(f"worker {args}: {error}")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    for r in range(rounds):
        for args in args_per_process:
            if (r, repr(args)) not in reported:
                failures[r].append(f"worker {args}: no report (the process died or hung)")
    return failures
