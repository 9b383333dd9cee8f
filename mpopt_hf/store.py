"""The profile store: what the profiler learned about a model on a device, kept across runs.

A profile is keyed by what changes the cost of a step (the model's signature, the input
shape, the dtype, the device and the torch version) and holds the measurements taken and the
fitted memory-model coefficients, as JSON (never pickle: a store may be shared, and JSON can be
read by a person). SQLite is the default (one file in the user's cache folder, WAL mode so that
two training processes can write at once); Redis is used when given a ``redis://`` URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .config import MemoryConfig

SCHEMA_VERSION = 1
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class StoreError(RuntimeError):
    """The profile store cannot be used as it is."""


class StoreCorruptError(StoreError):
    """The store's file or keys hold something that is not a valid profile."""


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


class SQLiteStore:
    """A profile store in one SQLite file; safe for several writer processes (WAL, busy timeout)."""

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self._fix = (
            f"Move {self.path} aside or delete it to start afresh (the profiler re-measures), "
            f"or pass another store path."
        )
        if self.path.is_dir():
            raise StoreError(f"The profile store path {self.path} is a directory; give a file path such as "
                             f"{self.path / 'profiles.sqlite'}.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes the lock up front
            self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            self._check_readable()
            self._conn.execute("PRAGMA journal_mode = WAL")
            with self._write():
                for statement in filter(str.strip, _SQLITE_SCHEMA.split(";")):
                    self._conn.execute(statement)
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise StoreError(f"The profile store {self.path} stayed locked for {timeout_s:.0f} s ({err}).") from err
            raise StoreCorruptError(f"The profile store {self.path} is not a readable SQLite file ({err}). "
                                    f"{self._fix}") from err
        version = self._conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        if version is None or version[0] != str(SCHEMA_VERSION):
            raise StoreError(f"The profile store {self.path} has schema version {version and version[0]!r}, this "
                             f"library reads version {SCHEMA_VERSION}. {self._fix}")

    def _check_readable(self) -> None:
        """Refuse a truncated or damaged file loudly instead of silently starting a new one over it."""
        if self.path.exists() and self.path.stat().st_size > 0:
            result = self._conn.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {result and result[0]}")

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: Any, *_: Any) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def _write(self) -> "SQLiteStore._Tx":
        return SQLiteStore._Tx(self._conn)

    def _run(self, fn: Any) -> Any:
        try:
            return fn()
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise StoreError(f"The profile store {self.path} stayed locked ({err}).") from err
            raise StoreCorruptError(f"The profile store {self.path} cannot be read ({err}). {self._fix}") from err

    def _register(self, conn: sqlite3.Connection, key: ProfileKey) -> str:
        digest = key.digest()
        conn.execute("INSERT OR IGNORE INTO profiles VALUES (?, ?)", (digest, json.dumps(key.to_dict(), sort_keys=True)))
        return digest

    def add_measurement(self, key: ProfileKey, config: MemoryConfig, data: dict[str, Any]) -> None:
        def go() -> None:
            with self._write() as conn:
                digest = self._register(conn, key)
                conn.execute(
                    "INSERT INTO measurements (key, config, data, created) VALUES (?, ?, ?, ?)",
                    (digest, config.to_json(), json.dumps(data, sort_keys=True), time.time()),
                )

        self._run(go)

    def measurements(self, key: ProfileKey) -> list[StoredMeasurement]:
        rows = self._run(lambda: self._conn.execute(
            "SELECT id, config, data, created FROM measurements WHERE key = ? ORDER BY id", (key.digest(),)
        ).fetchall())
        out = []
        for row_id, config, data, created in rows:
            where = f"{self.path} (measurements row {row_id})"
            out.append(StoredMeasurement(
                _decode_config(_decode(config, where, self._fix), where, self._fix),
                _decode(data, where, self._fix), created))
        return out

    def save_fit(self, key: ProfileKey, fit: dict[str, Any]) -> None:
        def go() -> None:
            with self._write() as conn:
                digest = self._register(conn, key)
                conn.execute("INSERT OR REPLACE INTO fits VALUES (?, ?, ?)",
                             (digest, json.dumps(fit, sort_keys=True), time.time()))

        self._run(go)

    def load_fit(self, key: ProfileKey) -> dict[str, Any] | None:
        row = self._run(lambda: self._conn.execute("SELECT data FROM fits WHERE key = ?", (key.digest(),)).fetchone())
        return None if row is None else _decode(row[0], f"{self.path} (fit of {key.digest()})", self._fix)

    def mark_infeasible(self, key: ProfileKey, config: MemoryConfig, reason: str = "") -> None:
        def go() -> None:
            with self._write() as conn:
                digest = self._register(conn, key)
                conn.execute("INSERT OR REPLACE INTO infeasible VALUES (?, ?, ?, ?)",
                             (digest, config.to_json(), reason, time.time()))

        self._run(go)

    def infeasible(self, key: ProfileKey) -> dict[MemoryConfig, str]:
        rows = self._run(lambda: self._conn.execute(
            "SELECT config, reason FROM infeasible WHERE key = ?", (key.digest(),)).fetchall())
        where = f"{self.path} (infeasible of {key.digest()})"
        return {_decode_config(_decode(c, where, self._fix), where, self._fix): r for c, r in rows}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- Redis


class RedisStore:
    """A profile store on a Redis server (shared by several machines of the same kind).

    Measurements are a list per key (``RPUSH`` is atomic, so concurrent writers lose nothing),
    the fit a string, infeasible configurations a hash.
    """

    def __init__(self, url: str, prefix: str = "mpopt_hf") -> None:
        try:
            import redis
        except ImportError as err:
            raise StoreError(f"A Redis store ({url}) needs the redis client: pip install 'mpopt-hf[redis]'.") from err
        self.location = url
        self._prefix = prefix
        self._client = redis.Redis.from_url(url)
        try:
            self._client.ping()
        except redis.RedisError as err:
            raise StoreError(f"Cannot reach the Redis profile store at {url} ({err}). Start redis-server or pass a "
                             f"SQLite path with --store.") from err

    def _k(self, key: ProfileKey, part: str) -> str:
        return f"{self._prefix}:{key.digest()}:{part}"

    def _fix(self, redis_key: str) -> str:
        return f"Delete it to start afresh (redis-cli -u {self.location} DEL {redis_key})."

    def _register(self, pipe: Any, key: ProfileKey) -> None:
        pipe.set(self._k(key, "key"), json.dumps(key.to_dict(), sort_keys=True))

    def add_measurement(self, key: ProfileKey, config: MemoryConfig, data: dict[str, Any]) -> None:
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
        pipe = self._client.pipeline()
        self._register(pipe, key)
        pipe.set(self._k(key, "fit"), json.dumps(fit, sort_keys=True))
        pipe.execute()

    def load_fit(self, key: ProfileKey) -> dict[str, Any] | None:
        rkey = self._k(key, "fit")
        raw = self._client.get(rkey)
        return None if raw is None else _decode(raw, f"{self.location} key {rkey}", self._fix(rkey))

    def mark_infeasible(self, key: ProfileKey, config: MemoryConfig, reason: str = "") -> None:
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


def open_store(url_or_path: str | os.PathLike[str] | None = None) -> SQLiteStore | RedisStore:
    """The store at ``url_or_path``: ``redis://…`` (or ``rediss://``, ``unix://``) for Redis, a file path
    (or ``sqlite:///path``) for SQLite, ``None`` for the default file in the user's cache folder."""
    if url_or_path is None or str(url_or_path) == "":
        return SQLiteStore(default_store_path())
    text = str(url_or_path)
    if text.startswith(REDIS_SCHEMES):
        return RedisStore(text)
    if text.startswith("sqlite:///"):
        return SQLiteStore(text[len("sqlite:///"):])  # sqlite:///rel/path or sqlite:////abs/path
    if "://" in text:
        raise ValueError(f"Unknown profile store {text!r}: give a file path, sqlite:///path, or redis://host:port/db.")
    return SQLiteStore(text)
