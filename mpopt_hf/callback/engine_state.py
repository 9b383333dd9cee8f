"""The rule engine's state in a checkpoint: what `MPOptCallback` saves and reads back on resume.

The engine's state (JSON) is an `ExportableState` entry of Trainer's own ``trainer_state.json``: Trainer writes that
file last, after the weights and optimizer, so a checkpoint that Trainer can resume from always holds the engine's
state of the same step. Mid-race, the race's host copies (tensors) go to ``mpopt_race_snapshots.pt`` in the
checkpoint folder, written (atomically: temporary file, then ``os.replace``) while Trainer saves, before
``trainer_state.json``; the entry records the snapshot's id, so a snapshot that is missing or from another save is
detected on resume, never used. A checkpoint without the engine's state resumes with an `EngineStateWarning` and a
fresh search, or raises `EngineStateError` under ``MPOptArguments(strict_resume=True)``; unreadable state files
raise `EngineStateError` naming the file. Checkpoints older than the entry keep it in ``mpopt_engine.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten

from ..engine.events import Action, Drop, Restore, Snapshot
from ..training import snapshot

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RuleEngine

STATE_FILE = "mpopt_engine.json"  # the engine's state before it moved into trainer_state.json: still read on resume
SNAPSHOT_FILE = "mpopt_race_snapshots.pt"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME
STATE_FORMAT = 1

Loaded = tuple[dict[str, Any], str, dict[str, Any]]  # (the engine's saved state, its file, the race's copies)


class EngineStateWarning(UserWarning):
    """A checkpoint was resumed without the engine's state: the memory-configuration search restarts."""


class EngineStateError(RuntimeError):
    """The engine's state in a checkpoint is unreadable, or missing under ``MPOptArguments(strict_resume=True)``."""


def empty_entry() -> dict[str, Any]:
    """The entry of a run without an engine (yet): read on resume as "no state"."""
    return {"format": STATE_FORMAT, "engine": None}


def checkpoint_folder(args: Any, state: Any) -> str:
    """The folder Trainer's convention gives the checkpoint of the current step."""
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


def check_trainer_state(checkpoint_dir: str) -> None:
    """Fail on a missing or truncated ``trainer_state.json`` (the engine's state is in it), naming the file and
    what to do, rather than as Trainer's bare error."""
    path = os.path.join(checkpoint_dir, TRAINER_STATE_FILE)
    remedy = (f"resume from an earlier checkpoint, or delete the folder {checkpoint_dir} (resume_from_checkpoint="
              "True then picks the one before it).")
    if not os.path.isfile(path):
        raise EngineStateError(f"{path} is missing: the save of {checkpoint_dir} was interrupted before Trainer "
                               f"wrote its state (which holds the memory engine's too); {remedy}")
    read_json(path, "It holds Trainer's and the memory engine's state: " + remedy)


def saved_gain(payload: dict[str, Any], source: str) -> tuple[str, int | None]:
    """The (gain metric, evaluation chunk) a saved state was using: read before the engine is built (the metric
    sets the engine's ceiling)."""
    try:
        return payload["metric"], payload["eval_chunk"]
    except (KeyError, TypeError) as exc:
        raise _unfit(source, exc) from exc


def restore_engine(engine: RuleEngine, payload: dict[str, Any], source: str) -> None:
    """Load the saved state into ``engine``."""
    try:
        engine.load_state_dict(payload["engine"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _unfit(source, exc) from exc


def _unfit(source: str, exc: Exception) -> EngineStateError:
    return EngineStateError(
        f"The memory engine's state in {source} does not fit this engine ({type(exc).__name__}: {exc}); "
        f"resume from another checkpoint, or delete {_state_holder(source)} to restart the search."
    )


class EngineCheckpoint:
    """The race's host copies ("start" and "best"): taken and restored at the engine's request, saved with the
    engine's state in checkpoints and loaded back with it."""

    def __init__(self) -> None:
        self.copies: dict[str, Any] = {}
        self.copies_id: str | None = None  # changes with the copies: names them in the checkpoint's state
        self.copies_saved: tuple[str, str] | None = None  # (file, id) last written

    def held_bytes(self) -> int:
        """Bytes of the tensors the copies hold (host memory: on a CPU, inside the budget)."""
        return sum(t.numel() * t.element_size() for copy in self.copies.values()
                   for t in tree_flatten(copy)[0] if torch.is_tensor(t))

    def carry_out(self, action: Action, model: Any, optimizer: Any = None, scheduler: Any = None) -> None:
        """Carry out one of the engine's copy actions (`Snapshot`, `Restore`, `Drop`) on the weights, optimizer and
        scheduler; copies live on the CPU."""
        if isinstance(action, Snapshot):
            self.copies[action.which] = snapshot.capture(model, optimizer, scheduler)
            self.copies_id = None  # new copies: a new id at the next save
        elif isinstance(action, Restore):
            if action.which not in self.copies:
                raise RuntimeError(f"The engine asked to restore the {action.which!r} copy, but none was taken "
                                   f"(copies held: {sorted(self.copies)}).")
            snapshot.restore(self.copies[action.which], model, optimizer, scheduler)
        elif isinstance(action, Drop):
            self.copies.clear()
            self.copies_id = None
        else:
            raise ValueError(f"{action!r} is not a copy action (Snapshot, Restore, Drop).")

    def entry(self, engine: RuleEngine, extra: dict[str, Any], folder: Callable[[], str | None]) -> dict[str, Any]:
        """The `ExportableState` entry of ``engine`` (with the callback's ``extra`` fields); mid-race, the copies
        are written to ``folder()`` (the checkpoint being saved, None if unknown) and their id recorded."""
        payload = {"format": STATE_FORMAT, "engine": engine.state_dict(), **extra, "snapshot": None}
        if self.copies:  # a race is under way: its start and best trial's end are part of the state
            if self.copies_id is None:
                self.copies_id = uuid.uuid4().hex
            payload["snapshot"] = {"file": SNAPSHOT_FILE, "id": self.copies_id}
            where = folder()
            if where is not None:
                self.save_copies(where)
        return payload

    def save_copies(self, folder: str) -> None:
        path = os.path.join(folder, SNAPSHOT_FILE)
        if self.copies_saved == (path, self.copies_id) and os.path.isfile(path):
            return
        payload = {"format": STATE_FORMAT, "id": self.copies_id, "copies": self.copies}
        atomic_write(path, lambda f: torch.save(payload, f))
        self.copies_saved = (path, self.copies_id)

    def load(self, folder: str, state: Any, name: str, strict: bool) -> Loaded | None:
        """(the engine's saved state, the file it came from, the race's copies) of the checkpoint in ``folder``
        (``name``: the callback's entry in ``state.stateful_callbacks``); None, after an `EngineStateWarning`,
        when the checkpoint lacks them (`EngineStateError` if ``strict``)."""
        source = os.path.join(folder, TRAINER_STATE_FILE)
        entry = (getattr(state, "stateful_callbacks", None) or {}).get(name)
        if isinstance(entry, list):  # several MPOptCallbacks: Trainer keeps a list; one engine per trainer
            entry = entry[0] if entry else None
        legacy = not isinstance(entry, dict) or entry.get("engine") is None
        if legacy:  # saved before the state moved into trainer_state.json, or by a run without the engine
            source = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(source):
                return missing_state(folder, f"neither its {TRAINER_STATE_FILE} nor a {STATE_FILE} holds the memory "
                                             "engine's state", strict)
            entry = read_json(source, "Delete it to restart the memory-configuration search from this "
                                      "checkpoint, or resume from an earlier checkpoint.")
        if not isinstance(entry, dict) or not isinstance(entry.get("engine"), dict):
            raise EngineStateError(f"{source} does not hold a memory engine state (no 'engine' mapping); resume "
                                   f"from another checkpoint, or delete {_state_holder(source)} to restart the search.")
        copies: dict[str, Any] = {}
        if legacy:
            path = os.path.join(folder, SNAPSHOT_FILE)
            if os.path.isfile(path):
                copies = load_copies(path)
            return entry, source, copies
        snap = entry.get("snapshot")
        if snap is not None:  # saved mid-race: the copies must be those this state was saved with
            if not isinstance(snap, dict) or not isinstance(snap.get("file"), str) or "id" not in snap:
                raise EngineStateError(f"{source}: the memory engine's snapshot record {snap!r} is malformed; resume "
                                       "from another checkpoint.")
            path = os.path.join(folder, os.path.basename(snap["file"]))
            if not os.path.isfile(path):
                return missing_state(folder, f"the race snapshot {path} that its {TRAINER_STATE_FILE} records is "
                                             "missing (the save was interrupted, or the file was deleted)", strict)
            saved = load_copies(path)
            if not isinstance(saved, dict) or saved.get("id") != snap["id"]:
                return missing_state(folder, f"the race snapshot {path} is not the one its {TRAINER_STATE_FILE} "
                                             "records (left by another save)", strict)
            copies = saved["copies"]
            self.copies_id, self.copies_saved = snap["id"], None
        return entry, source, copies


def missing_state(folder: str, why: str, strict: bool) -> None:
    """Warn (or, if ``strict``, raise) that the checkpoint in ``folder`` lacks the engine's state."""
    message = (f"Resuming from {folder}: {why}. The memory-configuration search restarts from scratch: the "
               "engine's earlier decisions and measurements are lost.")
    if strict:
        raise EngineStateError(message + " Refused because MPOptArguments(strict_resume=True): resume from a "
                               "checkpoint that has the engine's state, or set strict_resume=False to restart the "
                               "search.")
    # the caller of `EngineCheckpoint.load` (the callback's setup), as when this lived in the callback
    warnings.warn(message + " (MPOptArguments(strict_resume=True) refuses instead.)", EngineStateWarning,
                  stacklevel=3)


# ---------------------------------------------------------------------------- state files


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in its folder, then `os.replace`: a process killed mid-write
    leaves the previous file (or none), never a truncated one."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power loss too (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_json(path: str, remedy: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineStateError(f"{path} is truncated or corrupt ({exc}). {remedy}") from exc


def load_copies(path: str) -> Any:
    """A race snapshot: tensors and plain containers only (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, an unpickling error: all mean "unreadable"
        raise EngineStateError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}). It holds the race's start and best-trial "
            "copies: delete it to restart the memory-configuration search from this checkpoint, or resume from an "
            "earlier checkpoint."
        ) from exc


def _state_holder(source: str) -> str:
    """What to delete to drop the engine's state: the legacy file, or its entry in trainer_state.json."""
    return source if os.path.basename(source) == STATE_FILE else f"the 'MPOptCallback' entry of {source}"


__all__ = [
    "SNAPSHOT_FILE",
    "STATE_FILE",
    "STATE_FORMAT",
    "TRAINER_STATE_FILE",
    "EngineCheckpoint",
    "EngineStateError",
    "EngineStateWarning",
    "atomic_write",
    "check_trainer_state",
    "checkpoint_folder",
    "empty_entry",
    "load_copies",
    "missing_state",
    "saved_gain",
    "read_json",
    "restore_engine",
]
