"""The SQLite profile store: one file in the user's cache folder, WAL mode so that two training processes can
write at once, read-only where this process may not (or should not) write."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

from ..config import MemoryConfig
from .base import (
    StoreCorruptError,
    StoredMeasurement,
    StoreError,
    StoreReadOnlyWarning,
    _decode,
    _decode_config,
    _resolve_read_only,
    logger,
)
from .keys import ProfileKey
from .sqlite_locks import (
    _SQLITE_NOT_CORRUPTION,
    _is_busy,
    _is_read_only_error,
    _Locked,
    _sqlite_code,
    _Tx,
    retrying,
)

SCHEMA_VERSION = 1

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (key TEXT PRIMARY KEY, key_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS measurements (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, config TEXT NOT NULL,
    data TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS measurements_key ON measurements (key);
CREATE TABLE IF NOT EXISTS fits (key TEXT PRIMARY KEY, data TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS infeasible (
    key TEXT NOT NULL, config TEXT NOT NULL, reason TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (key, config));
"""


def default_store_path() -> Path:
    """``$XDG_CACHE_HOME/mpopt_hf/profiles.sqlite`` (``~/.cache`` when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mpopt_hf" / "profiles.sqlite"


class SQLiteStore:
    """A profile store in one SQLite file; safe for several writer processes (WAL, busy timeout).

    Opening is safe when several processes open a new file at once: the switch to WAL mode (which SQLite
    answers with "database is locked" at once, without waiting, while another connection is writing) is
    retried with backoff until ``timeout_s``, and only made when the file is not in WAL mode already. Every
    lock error says how long it really waited.

    ``read_only``: ``True``, the store is only read and every write (``add_measurement``, ``save_fit``,
    ``mark_infeasible``) is skipped, so that a caller such as `fit_profile` needs no change; ``False``, a
    writer; ``None`` (the default), a writer on rank 0 and read-only on the other ranks of a distributed run
    (`process_rank`), so that N processes do not store N copies of the same measurements. A read-only store
    whose file does not exist yet (rank 0 has not created it) reads as empty until it does. A file this
    process may not write (no write permission, a read-only folder or file system) is opened read-only, with
    a warning that says so. ``skipped_writes`` counts the writes skipped.
    """

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 60.0, read_only: bool | None = None) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.timeout_s = float(timeout_s)
        self.skipped_writes = 0
        self._conn: sqlite3.Connection | None = None
        self._warned = False  # the read-only warning was given
        self._fix = (
            f"Move {self.path} aside or delete it to start afresh (the profiler re-measures), "
            f"or pass another store path."
        )
        if self.path.is_dir():
            raise StoreError(f"The profile store path {self.path} is a directory; give a file path such as "
                             f"{self.path / 'profiles.sqlite'}.")
        self.read_only, self.read_only_reason = _resolve_read_only(read_only)
        if not self.read_only:
            reason = self._unwritable_reason()
            if reason is not None:
                self._become_read_only(reason)
        if self.read_only:
            self._reader()  # refuse a damaged file now, not at the first read
            if not self._warned:
                logger.info("Profile store %s opened read-only: %s; its writes are skipped.", self.path,
                            self.read_only_reason)
            return
        try:
            self._open_writer()
        except StoreError as err:
            if not isinstance(err.__cause__, sqlite3.Error) or not _is_read_only_error(err.__cause__):
                raise
            self.close()
            self._become_read_only(f"SQLite may not write it ({err.__cause__})")
            self._reader()

    def _become_read_only(self, reason: str) -> None:
        self.read_only, self.read_only_reason, self._warned = True, reason, True
        warnings.warn(f"The profile store {self.path} is read-only ({reason}): opened read-only, so the profile "
                      f"is read from it but nothing this run measures is saved. Make it writable or pass another "
                      f"store path to keep new profiles.", StoreReadOnlyWarning, stacklevel=3)

    # -------------------------------------------------------------- opening

    def _unwritable_reason(self) -> str | None:
        """Why this process cannot write the store, or None. A missing file in a folder that cannot be
        created or written is an error: there is nothing to read either."""
        if self.path.exists():
            if not os.access(self.path, os.W_OK):
                return f"no write permission on {self.path}"
            if not os.access(self.path.parent, os.W_OK | os.X_OK):
                return (f"its folder {self.path.parent} is not writable, and SQLite needs to create "
                        f"{self.path.name}-wal and {self.path.name}-shm beside it")
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"Cannot create the profile store {self.path}: {err}. Pass a writable store path.") from err
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise StoreError(f"Cannot create the profile store {self.path}: its folder {self.path.parent} is not "
                             f"writable. Pass a writable store path.")
        return None

    def _open_writer(self) -> None:
        started = time.monotonic()
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the lock up front
            self._conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            self._retrying(self._check_readable, started)
            self._retrying(self._enable_wal, started)
            # WAL with synchronous=NORMAL cannot corrupt the file; a power cut may lose the last commits (a
            # profile that is re-measured), and commits stop waiting for an fsync each
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._retrying(self._create_schema, started)
        except _Locked as locked:
            self.close()
            raise self._locked_error(locked, "while opening it") from locked.err
        except sqlite3.DatabaseError as err:
            self.close()
            raise self._database_error(err) from err
        except BaseException:
            self.close()
            raise
        self._check_version(self._conn)

    def _enable_wal(self) -> None:
        """WAL mode, switched only when the file is not in it already (the switch needs an exclusive lock)."""
        assert self._conn is not None
        # a read first: the connection looks at the file's header, so that journal_mode reports 'wal' for a
        # file another process has switched already
        self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if self._conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"The profile store {self.path} could not be switched to WAL mode (SQLite kept "
                             f"journal_mode={mode!r}); several processes could not share it. Pass a store path "
                             f"on a local file system.")

    def _create_schema(self) -> None:
        """The tables, made in one transaction; a store that has them is only read (no write lock to wait for)."""
        assert self._conn is not None
        try:
            if self._conn.execute("SELECT 1 FROM meta WHERE name = 'schema_version'").fetchone() is not None:
                return
        except sqlite3.OperationalError as err:
            if "no such table" not in str(err):
                raise
        with self._write():
            for statement in filter(str.strip, _SQLITE_SCHEMA.split(";")):
                self._conn.execute(statement)  # type: ignore[union-attr]
            self._conn.execute(  # type: ignore[union-attr]
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _check_version(self, conn: sqlite3.Connection) -> None:
        try:
            version = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        except sqlite3.OperationalError as err:
            if self.read_only and "no such table" in str(err):
                return  # a read-only store whose writer has not created the tables yet: it reads as empty
            raise self._database_error(err) from err
        if version is None and self.read_only:
            return
        if version is None or version[0] != str(SCHEMA_VERSION):
            raise StoreError(f"The profile store {self.path} has schema version {version and version[0]!r}, this "
                             f"library reads version {SCHEMA_VERSION}. {self._fix}")

    def _reader(self) -> sqlite3.Connection | None:
        """The connection reads go through; a read-only store connects on first use, once its file exists."""
        if self._conn is not None or not self.read_only:
            return self._conn
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None  # not created yet (or created, not yet written): nothing to read
        started = time.monotonic()
        uri = "file:" + urllib.parse.quote(str(self.path.absolute())) + "?mode=ro"
        conn = None
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout_s, isolation_level=None)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError as err:
                if _is_busy(err) or not (_is_read_only_error(err) or _sqlite_code(err) == 14):
                    raise
                # a WAL file in a folder we may not write: SQLite cannot create its -shm, so read the file as
                # it is (immutable: changes another process makes while this one reads are not seen)
                conn.close()
                conn = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=self.timeout_s, isolation_level=None)
            self._conn = conn
            self._retrying(self._check_readable, started)
        except _Locked as locked:
            self.close()
            raise self._locked_error(locked, "while opening it read-only") from locked.err
        except sqlite3.DatabaseError as err:
            if conn is not None:
                conn.close()
            self._conn = None
            raise self._database_error(err) from err
        self._check_version(conn)
        return conn

    def _check_readable(self) -> None:
        """Refuse a truncated or damaged file loudly instead of silently starting a new one over it."""
        assert self._conn is not None
        if self.path.exists() and self.path.stat().st_size > 0:
            result = self._conn.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {result and result[0]}")

    # -------------------------------------------------------------- errors and retries

    def _retrying(self, fn: Any, started: float | None = None) -> Any:
        """``fn()``, again with backoff while SQLite answers "locked" before ``timeout_s`` has passed (`retrying`)."""
        return retrying(fn, self.timeout_s, started)

    def _locked_error(self, locked: _Locked, doing: str) -> StoreError:
        return StoreError(f"The profile store {self.path} stayed locked by another process {doing}: gave up after "
                          f"waiting {locked.waited_s:.2f} s (timeout_s={self.timeout_s:g}) ({locked.err}).")

    def _database_error(self, err: sqlite3.DatabaseError) -> StoreError:
        if _sqlite_code(err) in _SQLITE_NOT_CORRUPTION or _is_read_only_error(err):
            return StoreError(f"The profile store {self.path} cannot be opened ({err}).")
        return StoreCorruptError(f"The profile store {self.path} is not a readable SQLite file ({err}). {self._fix}")

    def _write(self) -> _Tx:
        assert self._conn is not None
        return _Tx(self._conn)

    def _run(self, fn: Any) -> Any:
        try:
            return self._retrying(fn)
        except _Locked as locked:
            raise self._locked_error(locked, "") from locked.err
        except sqlite3.DatabaseError as err:
            if _sqlite_code(err) in _SQLITE_NOT_CORRUPTION or _is_read_only_error(err):
                raise StoreError(f"The profile store {self.path} cannot be used ({err}).") from err
            raise StoreCorruptError(f"The profile store {self.path} cannot be read ({err}). {self._fix}") from err

    def _query(self, sql: str, params: tuple, one: bool = False) -> Any:
        def go() -> Any:
            conn = self._reader()
            if conn is None:
                return None if one else []
            try:
                cursor = conn.execute(sql, params)
            except sqlite3.OperationalError as err:
                if self.read_only and "no such table" in str(err):
                    return None if one else []  # the writer has not created the tables yet
                raise
            return cursor.fetchone() if one else cursor.fetchall()

        return self._run(go)

    def _writes(self) -> bool:
        """Whether a write goes ahead; on a read-only store it is skipped (and counted)."""
        if self.read_only:
            self.skipped_writes += 1
            return False
        return True

    def _register(self, conn: sqlite3.Connection, key: ProfileKey) -> str:
        digest = key.digest()
        conn.execute("INSERT OR IGNORE INTO profiles VALUES (?, ?)", (digest, json.dumps(key.to_dict(), sort_keys=True)))
        return digest

    def add_measurement(self, key: ProfileKey, config: MemoryConfig, data: dict[str, Any]) -> None:
        if not self._writes():
            return

        def go() -> None:
            with self._write() as conn:
                digest = self._register(conn, key)
                conn.execute(
                    "INSERT INTO measurements (key, config, data, created) VALUES (?, ?, ?, ?)",
                    (digest, config.to_json(), json.dumps(data, sort_keys=True), time.time()),
                )

        self._run(go)

    def measurements(self, key: ProfileKey) -> list[StoredMeasurement]:
        rows = self._query("SELECT id, config, data, created FROM measurements WHERE key = ? ORDER BY id",
                           (key.digest(),))
        out = []
        for row_id, config, data, created in rows:
            where = f"{self.path} (measurements row {row_id})"
            out.append(StoredMeasurement(
                _decode_config(_decode(config, where, self._fix), where, self._fix),
                _decode(data, where, self._fix), created))
        return out

    def save_fit(self, key: ProfileKey, fit: dict[str, Any]) -> None:
        if not self._writes():
            return

        def go() -> None:
            with self._write() as conn:
                digest = self._register(conn, key)
                conn.execute("INSERT OR REPLACE INTO fits VALUES (?, ?, ?)",
                             (digest, json.dumps(fit, sort_keys=True), time.time()))

        self._run(go)

    def load_fit(self, key: ProfileKey) -> dict[str, Any] | None:
        row = self._query("SELECT data FROM fits WHERE key = ?", (key.digest(),), one=True)
        return None if row is None else _decode(row[0], f"{self.path} (fit of {key.digest()})", self._fix)

    def mark_infeasible(self, key: ProfileKey, config: MemoryConfig, reason: str = "") -> None:
        if not self._writes():
            return

        def go() -> None:
            with self._write() as conn:
                digest = self._register(conn, key)
                conn.execute("INSERT OR REPLACE INTO infeasible VALUES (?, ?, ?, ?)",
                             (digest, config.to_json(), reason, time.time()))

        self._run(go)

    def infeasible(self, key: ProfileKey) -> dict[MemoryConfig, str]:
        rows = self._query("SELECT config, reason FROM infeasible WHERE key = ?", (key.digest(),))
        where = f"{self.path} (infeasible of {key.digest()})"
        return {_decode_config(_decode(c, where, self._fix), where, self._fix): r for c, r in rows}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
