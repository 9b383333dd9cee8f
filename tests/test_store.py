"""The SQLite profile store: round trips, concurrent writers and openers, read-only stores, malformed URLs,
and loud failure on a damaged file."""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from concurrency import run_concurrently, run_rounds_behind_barrier
from mpopt_hf.config import MemoryConfig
from mpopt_hf.store import (
    ProfileKey,
    SQLiteStore,
    StoreCorruptError,
    StoreError,
    StoreReadOnlyWarning,
    default_store_path,
    make_key,
    model_signature,
    open_store,
    process_rank,
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
    checkpoint = sqlite3.connect(path)
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    checkpoint.close()
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"not a database" + raw[100:])
    damaged = path.read_bytes()
    for read_only in (None, True):  # a reader is as strict as a writer
        with pytest.raises(StoreCorruptError, match=rf"{path.name}.*(delete|start afresh)"):
            store = open_store(path, read_only=read_only)
            store.measurements(KEY)
    assert path.read_bytes() == damaged  # left as it was, for the user to look at
    # (a read-only SQLite connection leaves an empty -wal and -shm behind: SQLite's, nothing of the file's)
    assert all(p.stat().st_size == 0 for p in tmp_path.glob("p.sqlite-wal"))


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


# ----------------------------------------------------------------------------- opening a fresh store at once


def _open_fresh(round_: int, folder: str, worker: int, n: int, write_rounds: int) -> None:
    """Round < write_rounds: open a new store and write ``n`` records; after that: only open a new store (the
    open is where the old race was, so many short rounds hit it far more often)."""
    if round_ < write_rounds:
        store = SQLiteStore(Path(folder) / f"round{round_}.sqlite", timeout_s=30)
        for i in range(n):
            store.add_measurement(KEY, MemoryConfig(1 + i), {"worker": worker, "i": i})
        store.close()
    else:
        SQLiteStore(Path(folder) / f"open{round_}.sqlite", timeout_s=30).close()


def _fresh_store_race(folder: Path, write_rounds: int, open_rounds: int, workers: int = 4, records: int = 200) -> None:
    started = time.monotonic()
    failures = run_rounds_behind_barrier(_open_fresh, [(str(folder), w, records, write_rounds) for w in range(workers)],
                                         write_rounds + open_rounds)
    elapsed = time.monotonic() - started
    counts = []
    for r in range(write_rounds):
        with SQLiteStore(folder / f"round{r}.sqlite", read_only=False) as store:
            rows = store.measurements(KEY)
        counts.append(len(rows))
        assert sorted((m.data["worker"], m.data["i"]) for m in rows) == [
            (w, i) for w in range(workers) for i in range(records)], f"round {r} lost or doubled records"
    write_failed = [f for per_round in failures[:write_rounds] for f in per_round]
    open_failed = [f for per_round in failures[write_rounds:] for f in per_round]
    print(f"\n{write_rounds} rounds x {workers} processes x {records} records: {len(write_failed)} failures, records "
          f"per round {sorted(set(counts))}; {open_rounds} open-only rounds x {workers} processes: {len(open_failed)} "
          f"failures; {elapsed:.1f} s")
    assert write_failed == [] and open_failed == []
    assert counts == [workers * records] * write_rounds


def test_four_processes_open_a_fresh_store_at_once(tmp_path):
    """The old failure: a process switching a new file to WAL while another held its lock got "database is
    locked" at once (before the fix: 27 of 200 open-only rounds failed here, and about 4 in 100 write rounds).
    4 processes behind a barrier: 20 rounds of open + 200 records each, then 200 rounds of open only."""
    _fresh_store_race(tmp_path, write_rounds=20, open_rounds=200)


@pytest.mark.slow
def test_four_processes_open_a_fresh_store_at_once_long(tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the long fresh-store race: run with -m slow (20 + 200 rounds run by default)")
    _fresh_store_race(tmp_path, write_rounds=100, open_rounds=1000)


def _hold_reserved(path: Path) -> sqlite3.Connection:
    """A connection that holds the write lock (RESERVED) on a new file that is not in WAL mode."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("CREATE TABLE other_writer (x)")
    return conn


def test_open_waits_for_a_writer_holding_the_lock(tmp_path):
    """Deterministic form of the race: SQLite refuses the switch to WAL at once, without its busy handler, while
    another connection holds RESERVED; the store retries until that writer commits."""
    path = tmp_path / "p.sqlite"
    holder = _hold_reserved(path)
    releaser = threading.Timer(0.4, lambda: holder.execute("COMMIT"))
    started = time.monotonic()
    releaser.start()
    try:
        with SQLiteStore(path, timeout_s=20) as store:
            waited = time.monotonic() - started
            store.add_measurement(KEY, MemoryConfig(2), {"ok": 1})
            assert len(store.measurements(KEY)) == 1
    finally:
        releaser.join()
        holder.close()
    assert 0.3 < waited < 10
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_open_gives_up_after_the_timeout_and_says_how_long_it_waited(tmp_path):
    path = tmp_path / "p.sqlite"
    holder = _hold_reserved(path)
    started = time.monotonic()
    try:
        with pytest.raises(StoreError, match=r"p\.sqlite stayed locked.*gave up after waiting 0\.[5-9]\d s "
                                             r"\(timeout_s=0\.5\)") as info:
            SQLiteStore(path, timeout_s=0.5)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert 0.5 <= waited < 5
    assert not isinstance(info.value, StoreCorruptError)


def test_a_write_that_waits_out_the_timeout_says_how_long_it_waited(tmp_path):
    path = tmp_path / "p.sqlite"
    with SQLiteStore(path, timeout_s=0.3) as store:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError, match=r"stayed locked.*gave up after waiting 0\.[3-9]\d s \(timeout_s=0\.3\)"):
                store.add_measurement(KEY, MemoryConfig(2), {"ok": 1})
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        store.add_measurement(KEY, MemoryConfig(2), {"ok": 1})  # the failed write left no transaction open
        assert len(store.measurements(KEY)) == 1


def test_open_does_not_switch_a_store_already_in_wal_mode(tmp_path):
    """A second opener finds WAL mode and never asks for the exclusive lock, even while a writer is busy."""
    path = tmp_path / "p.sqlite"
    SQLiteStore(path).close()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO meta VALUES ('busy', '1')")
    started = time.monotonic()
    try:
        with SQLiteStore(path, timeout_s=5) as store:
            assert store.measurements(KEY) == []
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert time.monotonic() - started < 2


# ----------------------------------------------------------------------------- only rank 0 writes


def _filled_store(path: Path) -> None:
    with SQLiteStore(path, read_only=False) as store:
        store.add_measurement(KEY, MemoryConfig(2), {"rank": 0})
        store.save_fit(KEY, {"a": 1})


def test_other_ranks_read_and_skip_writes(tmp_path, monkeypatch):
    path = tmp_path / "p.sqlite"
    from accelerate.state import PartialState

    monkeypatch.setattr(PartialState, "_shared_state", {})  # a Trainer earlier in this process set up rank 0
    monkeypatch.setenv("RANK", "1")  # as torchrun / accelerate launch set it
    assert process_rank() == 1
    with open_store(path) as reader:  # before rank 0 has created the file: reads as empty
        assert reader.read_only and "rank 1" in reader.read_only_reason
        assert reader.load_fit(KEY) is None and reader.measurements(KEY) == [] and reader.infeasible(KEY) == {}
        assert not path.exists()
        _filled_store(path)  # rank 0 writes; the reader sees it on its next read
        assert reader.load_fit(KEY) == {"a": 1}
        reader.add_measurement(KEY, MemoryConfig(4), {"rank": 1})
        reader.save_fit(KEY, {"a": 2})
        reader.mark_infeasible(KEY, MemoryConfig(8), "OOM")
        assert reader.skipped_writes == 3
        assert [m.data for m in reader.measurements(KEY)] == [{"rank": 0}]
    with SQLiteStore(path, read_only=False) as store:
        assert [m.data for m in store.measurements(KEY)] == [{"rank": 0}]
        assert store.load_fit(KEY) == {"a": 1} and store.infeasible(KEY) == {}
    with open_store(path, read_only=False) as forced:  # a caller that knows better
        assert not forced.read_only and forced.read_only_reason == ""
    monkeypatch.setenv("RANK", "0")
    with open_store(path) as rank0:
        assert not rank0.read_only


def test_rank_comes_from_torch_distributed_then_accelerate(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("RANK", raising=False)
    assert process_rank() == 0
    fake_state = types.ModuleType("accelerate.state")
    fake_state.PartialState = type("PartialState", (), {"_shared_state": {"process_index": 2}})
    monkeypatch.setitem(sys.modules, "accelerate.state", fake_state)
    assert process_rank() == 2
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    assert process_rank() == 3


# ----------------------------------------------------------------------------- read-only files and folders


def _in_child(fn, *args):
    """``fn(*args)`` in a forked child that runs as user nobody when this test runs as root (root may write
    anything, whatever its mode); its result, or its exception re-raised here."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                out = ("ok", fn(*args))
            except BaseException as err:  # noqa: BLE001
                out = ("err", err)
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(out, pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "err":
        raise value
    return value


@pytest.fixture
def shared_dir():
    """A folder user nobody can reach (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="mpopt_store_"))
    folder.chmod(0o755)
    yield folder
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR)
    shutil.rmtree(folder)


def _read_only_open(path: str):
    with warnings_caught() as caught:
        store = open_store(path)
        out = {
            "read_only": store.read_only,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, StoreReadOnlyWarning)],
            "measurements": [m.data for m in store.measurements(KEY)],
            "fit": store.load_fit(KEY),
        }
        store.add_measurement(KEY, MemoryConfig(4), {"new": 1})
        store.save_fit(KEY, {"a": 2})
        store.mark_infeasible(KEY, MemoryConfig(8), "OOM")
        out["skipped"] = store.skipped_writes
        out["after"] = [m.data for m in store.measurements(KEY)]
        store.close()
    return out


def warnings_caught():
    import warnings

    class _Catch(warnings.catch_warnings):
        def __enter__(self):
            caught = super().__enter__()
            warnings.simplefilter("always")
            return caught

    return _Catch(record=True)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_read_only_store_opens_read_only_and_says_so(shared_dir, what):
    path = shared_dir / "p.sqlite"
    _filled_store(path)
    if what == "file":
        path.chmod(0o444)
    else:  # the file may be written, its folder not (SQLite could not create the -wal and -shm)
        path.chmod(0o666)
        shared_dir.chmod(0o555)
    before = path.read_bytes()
    out = _in_child(_read_only_open, str(path))
    assert out["read_only"]
    assert len(out["warnings"]) == 1
    message = out["warnings"][0]
    assert "p.sqlite is read-only" in message and "opened read-only" in message and "corrupt" not in message
    assert ("no write permission" if what == "file" else "is not writable") in message
    assert out["measurements"] == out["after"] == [{"rank": 0}] and out["fit"] == {"a": 1}
    assert out["skipped"] == 3
    assert path.read_bytes() == before


def test_new_store_in_a_read_only_folder_is_an_error_not_corruption(shared_dir):
    shared_dir.chmod(0o555)
    with pytest.raises(StoreError, match=r"Cannot create the profile store .*p\.sqlite.*not writable") as info:
        _in_child(SQLiteStore, str(shared_dir / "p.sqlite"))
    assert not isinstance(info.value, StoreCorruptError)


# ----------------------------------------------------------------------------- malformed URLs


@pytest.mark.parametrize("value", ["redis:/x", "redis:x", "rediss:/host:6380", "redis:", "REDIS://host",
                                   "sqlite:x.db", "sqlite://x.db", "sqlite:///", "unix://", "file:x.sqlite",
                                   "mongodb://x", "http://host/p.sqlite"])
def test_malformed_url_is_refused_naming_it_and_the_accepted_forms(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        open_store(value)
    message = str(info.value)
    assert repr(value) in message
    assert "sqlite:///" in message and "redis://host:port/db" in message and "file path" in message
    assert list(tmp_path.iterdir()) == []  # no SQLite file named after the URL


def test_file_names_with_a_colon_are_still_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_store("run-12:30.sqlite") as store:
        assert isinstance(store, SQLiteStore)
    with open_store("sqlite:///rel/p.sqlite") as store:
        assert store.path == Path("rel/p.sqlite")
    assert (tmp_path / "run-12:30.sqlite").exists() and (tmp_path / "rel" / "p.sqlite").exists()
