"""SQLite's answers sorted (locked or busy, read-only, corrupt or not), the wait on a lock with backoff, and
the write transaction the SQLite store runs its writes in."""

from __future__ import annotations

import random
import sqlite3
import time
from typing import Any

_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 5, 6, 8
_SQLITE_NOT_CORRUPTION = {3, 10, 13, 14}  # PERM, IOERR, FULL, CANTOPEN: the file may be fine


def _sqlite_code(err: sqlite3.Error) -> int | None:
    code = getattr(err, "sqlite_errorcode", None)  # Python >= 3.11
    return None if code is None else code & 0xFF


def _is_busy(err: sqlite3.Error) -> bool:
    code = _sqlite_code(err)
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return isinstance(err, sqlite3.OperationalError) and ("locked" in str(err) or "busy" in str(err))


def _is_read_only_error(err: sqlite3.Error) -> bool:
    code = _sqlite_code(err)
    return code == _SQLITE_READONLY if code is not None else "readonly" in str(err)


class _Locked(Exception):
    """A lock that did not clear within the store's timeout (turned into a `StoreError` with the real wait)."""

    def __init__(self, err: sqlite3.Error, waited_s: float) -> None:
        super().__init__(str(err))
        self.err, self.waited_s = err, waited_s


def retrying(fn: Any, timeout_s: float, started: float | None = None) -> Any:
    """``fn()``, again with backoff while SQLite answers "locked" before ``timeout_s`` has passed (it does so
    at once, without waiting, where waiting could deadlock: a lock upgrade such as the switch to WAL)."""
    started = time.monotonic() if started is None else started
    delay = 0.001
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as err:
            if not _is_busy(err):
                raise
            waited = time.monotonic() - started
            left = timeout_s - waited
            if left <= 0:
                raise _Locked(err, waited) from err
            time.sleep(min(left, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 2, 0.1)


class _Tx:
    """``BEGIN IMMEDIATE`` (the write lock taken up front) ... ``COMMIT``, or ``ROLLBACK`` on an error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the error that brought us here is the one to see
