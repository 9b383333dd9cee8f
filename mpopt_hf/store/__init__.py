"""The profile store: what the profiler learned about a model on a device, kept across runs.

A profile is keyed by what changes the cost of a step (the model's signature, the input
shape, the dtype, the device and the torch version) and holds the measurements taken and the
fitted memory-model coefficients, as JSON (never pickle: a store may be shared, and JSON can be
read by a person). SQLite is the default (one file in the user's cache folder, WAL mode so that
two training processes can write at once); Redis is used when given a ``redis://`` URL.

In a distributed run only rank 0 writes: a store opened with the default ``read_only=None`` on any other
rank reads and skips its writes (see `process_rank`), so that the profiler, which runs on every rank, stores
one copy of its measurements. A store file this process may not write opens read-only, with a warning.

* `keys`: `ProfileKey`, `make_key`, `model_signature`, `device_name`: what a profile is stored under;
* `base`: the errors, the records and the `ProfileStore` protocol both backends follow, `process_rank`;
* `sqlite` (`SQLiteStore`, the default) and `redis` (`RedisStore`); `open_store` picks one from a path or URL.
"""

from __future__ import annotations

import os

from .base import (
    ProfileStore,
    StoreCorruptError,
    StoredMeasurement,
    StoreError,
    StoreReadOnlyWarning,
    logger,
    process_rank,
)
from .keys import ProfileKey, device_name, make_key, model_signature
from .redis import RedisStore
from .sqlite import SCHEMA_VERSION, SQLiteStore, default_store_path

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# a value that starts with one of these followed by ':' is meant as a URL, never as a file name
_URL_SCHEMES = ("redis", "rediss", "unix", "sqlite", "sqlite3", "file", "http", "https", "postgres", "postgresql",
                "mysql", "mongodb")
ACCEPTED_STORES = ("a file path (profiles.sqlite, /data/profiles.sqlite), sqlite:///relative/path, "
                   "sqlite:////absolute/path, redis://host:port/db, rediss://host:port/db (TLS) or "
                   "unix:///path/to/redis.sock")

__all__ = [
    "ACCEPTED_STORES", "REDIS_SCHEMES", "SCHEMA_VERSION", "ProfileKey", "ProfileStore", "RedisStore", "SQLiteStore",
    "StoreCorruptError", "StoreError", "StoreReadOnlyWarning", "StoredMeasurement", "default_store_path",
    "device_name", "logger", "make_key", "model_signature", "open_store", "process_rank",
]


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
