"""The SQLite profile store: round trips, concurrent writers, and loud failure on a damaged file."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from concurrency import run_concurrently
from mpopt_hf.config import MemoryConfig
from mpopt_hf.store import (
    ProfileKey,
    SQLiteStore,
    StoreCorruptError,
    default_store_path,
    make_key,
    model_signature,
    open_store,
)

KEY = ProfileKey(model_signature="Net:abc:10", input_shape=(3, 8, 8), dtype="float32", device="cpu")


def test_round_trip(tmp_path):
    with open_store(tmp_path / "p.sqlite") as store:
        cfg = MemoryConfig(4, 0.5, 1, "bf16")
        store.add_measurement(KEY, cfg, {"peak_bytes": 123, "step_s": 0.5})
        store.save_fit(KEY, {"a": [1.0, 2.0]})
        store.mark_infeasible(KEY, cfg.replace(micro_batch_size=8), "OOM")
        assert [(m.config, m.data) for m in store.measurements(KEY)] == [(cfg, {"peak_bytes": 123, "step_s": 0.5})]
        assert store.load_fit(KEY) == {"a": [1.0, 2.0]}
        assert store.infeasible(KEY) == {cfg.replace(micro_batch_size=8): "OOM"}
        other = ProfileKey(**{**KEY.to_dict(), "input_shape": (3, 16, 16)})
        assert store.measurements(other) == [] and store.load_fit(other) is None
    assert sqlite3.connect(tmp_path / "p.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_default_path_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "mpopt_hf" / "profiles.sqlite"
    open_store(None).close()
    assert (tmp_path / "mpopt_hf" / "profiles.sqlite").exists()


def test_key_depends_on_architecture_not_weights():
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    assert model_signature(a) == model_signature(b)
    assert model_signature(a) != model_signature(torch.nn.Linear(4, 3))
    assert make_key(a, (4,)).digest() == make_key(b, (4,)).digest()
    assert make_key(a, (4,)).digest() != make_key(a, (5,)).digest()
    assert ProfileKey.from_dict(KEY.to_dict()) == KEY


def _writer(path: str, worker: int, n: int) -> None:
    store = SQLiteStore(path)
    for i in range(n):
        store.add_measurement(KEY, MemoryConfig(1 + i), {"worker": worker, "i": i})
        store.save_fit(KEY, {"worker": worker, "i": i})
    store.close()


def test_two_writer_processes_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    assert run_concurrently(_writer, [(path, w, 40) for w in range(2)]) == [0, 0]
    rows = SQLiteStore(path).measurements(KEY)
    assert sorted((m.data["worker"], m.data["i"]) for m in rows) == [(w, i) for w in range(2) for i in range(40)]
    assert SQLiteStore(path).load_fit(KEY)["i"] == 39


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_file_names_file_and_fix(tmp_path, damage):
    path = tmp_path / "p.sqlite"
    with SQLiteStore(path) as store:
        for i in range(200):
            store.add_measurement(KEY, MemoryConfig(1 + i), {"pad": "x" * 200})
    sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"not a database" + raw[100:])
    with pytest.raises(StoreCorruptError, match=rf"{path.name}.*(delete|start afresh)"):
        store = open_store(path)
        store.measurements(KEY)


def test_corrupt_record_is_an_error_not_silent(tmp_path):
    path = tmp_path / "p.sqlite"
    with SQLiteStore(path) as store:
        store.add_measurement(KEY, MemoryConfig(2), {"ok": 1})
    conn = sqlite3.connect(path)
    conn.execute("UPDATE measurements SET data = '{broken'")
    conn.commit()
    with SQLiteStore(path) as store, pytest.raises(StoreCorruptError, match="p.sqlite.*measurements row 1"):
        store.measurements(KEY)


def test_unknown_scheme_is_rejected():
    with pytest.raises(ValueError, match="redis://"):
        open_store("mongodb://x")
