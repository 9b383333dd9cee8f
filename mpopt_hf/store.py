"""The profile store: what the profiler learned about a model on a device, kept across runs.

A profile is keyed by what changes the cost of a step (the model's signature, the input
shape, the dtype, the device and the torch version) and holds the measurements taken and the
fitted memory-model coefficients, as JSON (never pickle: a store may be shared, and JSON can be
read by a person). SQLite is the default (one file in the user's cache folder, WAL mode so that
two training processes can write at once); Redis is used when given a ``redis://`` URL.

In a distributed run only rank 0 writes: a store opened with the default ``read_only=None`` on any other
rank reads and skips its writes (see `process_rank`), so that the profiler, which runs on every rank, stores
one copy of its measurements. A store file this process may not write opens read-only, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sqlite3
import sys
import time
import urllib.parse
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .config import MemoryConfig

SCHEMA_VERSION = 1
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# a value that starts with one of these followed by ':' is meant as a URL, never as a file name
_URL_SCHEMES = ("redis", "rediss", "unix", "sqlite", "sqlite3", "file", "http", "https", "postgres", "postgresql",
                "mysql", "mongodb")
ACCEPTED_STORES = ("a file path (profiles.sqlite, /data/profiles.sqlite), sqlite:///relative/path, "
                   "sqlite:////absolute/path, redis://host:port/db, rediss://host:port/db (TLS) or "
                   "unix:///path/to/redis.sock")

logger = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The profile store cannot be used as it is."""


class StoreCorruptError(StoreError):
    """The store's file or keys hold something that is not a valid profile."""


class StoreReadOnlyWarning(UserWarning):
    """The profile store could only be opened read-only: nothing measured in this run is saved to it."""


# ----------------------------------------------------------------------------- keys


def _stable_hash(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_signature(model: torch.nn.Module) -> str:
    """``Class:config-hash:parameter-count``: what identifies a model architecture, not its weights.

    A ``PreTrainedModel`` is hashed by its config (minus fields that do not change the graph's
    memory, such as the transformers version); a plain module by its printed structure.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        data = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    else:
        data = repr(model)
    n_params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}:{_stable_hash(data)}:{n_params}"


def device_name(device: torch.device | str) -> str:
    """A device's model name (``NVIDIA H100 80GB HBM3``), or ``cpu``: profiles do not move between them."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


@dataclass(frozen=True)
class ProfileKey:
    """Everything that changes what a configuration costs."""

    model_signature: str
    input_shape: tuple[int, ...]
    dtype: str
    device: str
    torch_version: str = field(default_factory=lambda: torch.__version__)
    optimizer: str = ""
    inputs: str = ""  # every batched input as name:shape:dtype, for models with several

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProfileKey":
        return cls(**{**data, "input_shape": tuple(data["input_shape"])})

    def digest(self) -> str:
        """A short, stable id used as the storage key."""
        return _stable_hash(self.to_dict())


def make_key(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> ProfileKey:
    """The key of ``model`` on ``device`` for per-sample inputs of ``input_shape``."""
    if dtype is None:
        first = next(model.parameters(), None)
        dtype = first.dtype if first is not None else torch.float32
    opt = "" if optimizer is None else f"{type(optimizer).__name__}:{_stable_hash(_optimizer_defaults(optimizer))}"
    return ProfileKey(
        model_signature=model_signature(model),
        input_shape=tuple(input_shape),
        dtype=str(dtype).replace("torch.", ""),
        device=device_name(device),
        optimizer=opt,
    )


def _optimizer_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {k: v for k, v in optimizer.defaults.items() if isinstance(v, (bool, int, float, str, type(None), tuple))}


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StoredMeasurement:
    """One measured configuration as it sits in the store."""

    config: MemoryConfig
    data: dict[str, Any]
    created: float = 0.0


class ProfileStore(Protocol):
    """What every backend offers. Writes are appends or whole-value replaces, so none is lost."""

    location: str

    def add_measurement(self, key: ProfileKey, config: MemoryConfig, data: dict[str, Any]) -> None: ...
    def measurements(self, key: ProfileKey) -> list[StoredMeasurement]: ...
    def save_fit(self, key: ProfileKey, fit: dict[str, Any]) -> None: ...
    def load_fit(self, key: ProfileKey) -> dict[str, Any] | None: ...
    def mark_infeasible(self, key: ProfileKey, config: MemoryConfig, reason: str = "") -> None: ...
    def infeasible(self, key: ProfileKey) -> dict[MemoryConfig, str]: ...
    def close(self) -> None: ...


def _decode(text: str | bytes, where: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreCorruptError(f"The profile store holds an unreadable record at {where} ({err}). {fix}") from err


def _decode_config(data: Any, where: str, fix: str) -> MemoryConfig:
    try:
        return MemoryConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise StoreCorruptError(f"The profile store holds an invalid configuration at {where} ({err}). {fix}") from err


# ----------------------------------------------------------------------------- SQLite

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


def process_rank() -> int:
    """This process's rank among the processes of one training run; 0 when it runs alone.

    torch.distributed's rank once its process group is up; else accelerate's ``PartialState`` when one was set
    up (only looked at when accelerate is already imported: it is never created here); else the ``RANK``
    variable that torchrun, ``accelerate launch`` and deepspeed set; else 0.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    accelerate_state = sys.modules.get("accelerate.state")
    partial = getattr(accelerate_state, "PartialState", None)
    shared = getattr(partial, "_shared_state", None)
    if isinstance(shared, dict) and shared.get("process_index") is not None:
        return int(shared["process_index"])
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _resolve_read_only(read_only: bool | None) -> tuple[bool, str]:
    """``read_only=None``: read-only on every process but rank 0 (see `process_rank`)."""
    if read_only is None:
        rank = process_rank()
        if rank == 0:
            return False, ""
        return True, f"this process is rank {rank} of a distributed run and only rank 0 writes"
    return (True, "it was opened with read_only=True") if read_only else (False, "")


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
                left = self.timeout_s - waited
                if left <= 0:
                    raise _Locked(err, waited) from err
                time.sleep(min(left, delay * random.uniform(0.5, 1.0)))
                delay = min(delay * 2, 0.1)

    def _locked_error(self, locked: _Locked, doing: str) -> StoreError:
        return StoreError(f"The profile store {self.path} stayed locked by another process {doing}: gave up after "
                          f"waiting {locked.waited_s:.2f} s (timeout_s={self.timeout_s:g}) ({locked.err}).")

    def _database_error(self, err: sqlite3.DatabaseError) -> StoreError:
        if _sqlite_code(err) in _SQLITE_NOT_CORRUPTION or _is_read_only_error(err):
            return StoreError(f"The profile store {self.path} cannot be opened ({err}).")
        return StoreCorruptError(f"The profile store {self.path} is not a readable SQLite file ({err}). {self._fix}")

    class _Tx:
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

    def _write(self) -> "SQLiteStore._Tx":
        assert self._conn is not None
        return SQLiteStore._Tx(self._conn)

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


# ----------------------------------------------------------------------------- Redis


class RedisStore:
    """A profile store on a Redis server (shared by several machines of the same kind).

    Measurements are a list per key (``RPUSH`` is atomic, so concurrent writers lose nothing),
    the fit a string, infeasible configurations a hash. ``read_only`` as for `SQLiteStore`: by default only
    rank 0 of a distributed run writes; on a read-only store every write is skipped (``skipped_writes``).
    """

    def __init__(self, url: str, prefix: str = "mpopt_hf", read_only: bool | None = None) -> None:
        try:
            import redis
        except ImportError as err:
            raise StoreError(f"A Redis store ({url}) needs the redis client: pip install 'mpopt-hf[redis]'.") from err
        self.location = url
        self._prefix = prefix
        self.read_only, self.read_only_reason = _resolve_read_only(read_only)
        self.skipped_writes = 0
        self._client = redis.Redis.from_url(url)
        try:
            self._client.ping()
        except redis.RedisError as err:
            raise StoreError(f"Cannot reach the Redis profile store at {url} ({err}). Start redis-server or pass a "
                             f"SQLite path with --store.") from err
        if self.read_only:
            logger.info("Profile store %s opened read-only: %s; its writes are skipped.", url, self.read_only_reason)

    def _writes(self) -> bool:
        if self.read_only:
            self.skipped_writes += 1
            return False
        return True

    def _k(self, key: ProfileKey, part: str) -> str:
        return f"{self._prefix}:{key.digest()}:{part}"

    def _fix(self, redis_key: str) -> str:
        return f"Delete it to start afresh (redis-cli -u {self.location} DEL {redis_key})."

    def _register(self, pipe: Any, key: ProfileKey) -> None:
        pipe.set(self._k(key, "key"), json.dumps(key.to_dict(), sort_keys=True))

    def add_measurement(self, key: ProfileKey, config: MemoryConfig, data: dict[str, Any]) -> None:
        if not self._writes():
            return
        record = {"config": config.to_dict(), "data": data, "created": time.time()}
        pipe = self._client.pipeline()
        self._register(pipe, key)
        pipe.rpush(self._k(key, "measurements"), json.dumps(record, sort_keys=True))
        pipe.execute()

    def measurements(self, key: ProfileKey) -> list[StoredMeasurement]:
        rkey = self._k(key, "measurements")
        out = []
        for i, raw in enumerate(self._client.lrange(rkey, 0, -1)):
            where = f"{self.location} key {rkey}[{i}]"
            record = _decode(raw, where, self._fix(rkey))
            if not isinstance(record, dict) or "config" not in record or "data" not in record:
                raise StoreCorruptError(f"The profile store holds an invalid record at {where}. {self._fix(rkey)}")
            out.append(StoredMeasurement(_decode_config(record["config"], where, self._fix(rkey)), record["data"],
                                         record.get("created", 0.0)))
        return out

    def save_fit(self, key: ProfileKey, fit: dict[str, Any]) -> None:
        if not self._writes():
            return
        pipe = self._client.pipeline()
        self._register(pipe, key)
        pipe.set(self._k(key, "fit"), json.dumps(fit, sort_keys=True))
        pipe.execute()

    def load_fit(self, key: ProfileKey) -> dict[str, Any] | None:
        rkey = self._k(key, "fit")
        raw = self._client.get(rkey)
        return None if raw is None else _decode(raw, f"{self.location} key {rkey}", self._fix(rkey))

    def mark_infeasible(self, key: ProfileKey, config: MemoryConfig, reason: str = "") -> None:
        if not self._writes():
            return
        pipe = self._client.pipeline()
        self._register(pipe, key)
        pipe.hset(self._k(key, "infeasible"), config.to_json(), reason)
        pipe.execute()

    def infeasible(self, key: ProfileKey) -> dict[MemoryConfig, str]:
        rkey = self._k(key, "infeasible")
        where = f"{self.location} key {rkey}"
        return {
            _decode_config(_decode(c, where, self._fix(rkey)), where, self._fix(rkey)): r.decode()
            for c, r in self._client.hgetall(rkey).items()
        }

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RedisStore":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def open_store(url_or_path: str | os.PathLike[str] | None = None,
               read_only: bool | None = None) -> SQLiteStore | RedisStore:
    """The store at ``url_or_path``: ``redis://…`` (or ``rediss://``, ``unix://``) for Redis, a file path
    (or ``sqlite:///path``) for SQLite, ``None`` for the default file in the user's cache folder.

    ``read_only``: see `SQLiteStore` (default: only rank 0 of a distributed run writes). A value that looks
    like a URL but is none of the accepted forms (``redis:/x``, ``sqlite:x``, ``mongodb://x``) is refused
    with a ValueError rather than taken as a file name."""
    if url_or_path is None or str(url_or_path) == "":
        return SQLiteStore(default_store_path(), read_only=read_only)
    if isinstance(url_or_path, os.PathLike):
        return SQLiteStore(url_or_path, read_only=read_only)
    text = str(url_or_path)
    malformed = ValueError(f"Malformed profile store {text!r}: give {ACCEPTED_STORES}.")
    if text.startswith(REDIS_SCHEMES):
        if text.startswith("unix://") and text[len("unix://"):].strip("/") == "":
            raise malformed  # a socket needs a path (redis:// alone is redis-py's localhost:6379)
        return RedisStore(text, read_only=read_only)
    if text.startswith("sqlite:///"):
        path = text[len("sqlite:///"):]  # sqlite:///rel/path or sqlite:////abs/path
        if path.strip("/") == "":
            raise malformed
        return SQLiteStore(path, read_only=read_only)
    scheme = text.split(":", 1)[0].lower() if ":" in text else None
    if "://" in text or scheme in _URL_SCHEMES:
        raise malformed
    return SQLiteStore(text, read_only=read_only)
