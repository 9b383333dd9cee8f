"""The Redis profile store against a real redis-server started on loopback for the test."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from concurrency import run_concurrently
from processes import free_port
from mpopt_hf.config import MemoryConfig
from mpopt_hf.store import ProfileKey, RedisStore, StoreCorruptError, open_store

pytest.importorskip("redis", reason="the redis Python client is not installed (pip install redis)")
REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server binary not found (apt-get install redis-server) - Redis store untested"
)
KEY = ProfileKey(model_signature="Net:abc:10", input_shape=(3, 8, 8), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    import redis

    port, workdir = free_port(), tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.skip(f"redis-server exited with {proc.returncode} on port {port}")
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_round_trip(redis_url):
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    cfg = MemoryConfig(4, 0.5, 1, "bf16")
    store.add_measurement(KEY, cfg, {"peak_bytes": 1})
    store.save_fit(KEY, {"c": 2})
    store.mark_infeasible(KEY, cfg, "OOM")
    assert [(m.config, m.data) for m in store.measurements(KEY)] == [(cfg, {"peak_bytes": 1})]
    assert store.load_fit(KEY) == {"c": 2}
    assert store.infeasible(KEY) == {cfg: "OOM"}
    store.close()


def _writer(url: str, worker: int, n: int) -> None:
    store = RedisStore(url, prefix="concurrent")
    for i in range(n):
        store.add_measurement(KEY, MemoryConfig(1 + i), {"worker": worker, "i": i})
    store.close()


def test_two_writer_processes_lose_nothing(redis_url):
    assert run_concurrently(_writer, [(redis_url, w, 50) for w in range(2)]) == [0, 0]
    rows = RedisStore(redis_url, prefix="concurrent").measurements(KEY)
    assert sorted((m.data["worker"], m.data["i"]) for m in rows) == [(w, i) for w in range(2) for i in range(50)]


def test_corrupt_value_names_key(redis_url):
    import redis

    store = RedisStore(redis_url, prefix="corrupt")
    redis.Redis.from_url(redis_url).set(f"corrupt:{KEY.digest()}:fit", b"{nope")
    with pytest.raises(StoreCorruptError, match=f"corrupt:{KEY.digest()}:fit.*DEL"):
        store.load_fit(KEY)


def test_unreachable_server_says_how_to_fix():
    from mpopt_hf.store import StoreError

    with pytest.raises(StoreError, match="redis-server"):
        RedisStore(f"redis://127.0.0.1:{free_port()}/0")


def test_other_ranks_read_and_skip_writes(redis_url, monkeypatch):
    writer = RedisStore(redis_url, prefix="ranks", read_only=False)
    writer.add_measurement(KEY, MemoryConfig(2), {"rank": 0})
    writer.save_fit(KEY, {"a": 1})
    from accelerate.state import PartialState

    monkeypatch.setattr(PartialState, "_shared_state", {})  # a Trainer earlier in this process set up rank 0
    monkeypatch.setenv("RANK", "1")
    via_url = open_store(redis_url)
    assert isinstance(via_url, RedisStore) and via_url.read_only
    via_url.close()
    reader = RedisStore(redis_url, prefix="ranks")  # read_only=None: decided by the rank
    assert reader.read_only and "rank 1" in reader.read_only_reason
    reader.add_measurement(KEY, MemoryConfig(4), {"rank": 1})
    reader.save_fit(KEY, {"a": 2})
    reader.mark_infeasible(KEY, MemoryConfig(8), "OOM")
    assert reader.skipped_writes == 3
    assert [m.data for m in writer.measurements(KEY)] == [{"rank": 0}]
    assert writer.load_fit(KEY) == {"a": 1} and writer.infeasible(KEY) == {}
    assert [m.data for m in reader.measurements(KEY)] == [{"rank": 0}]
    reader.close()
    writer.close()
