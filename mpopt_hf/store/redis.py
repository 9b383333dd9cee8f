"""The Redis profile store, for a store shared by several machines of the same kind."""

from __future__ import annotations

import json
import time
from typing import Any

from ..config import MemoryConfig
from .base import (
    StoreCorruptError,
    StoredMeasurement,
    StoreError,
    _decode,
    _decode_config,
    _resolve_read_only,
    logger,
)
from .keys import ProfileKey


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
