"""`MPOptCallback`'s state in Trainer's checkpoints: its `ExportableState` entry, the race's copies written
beside it, and, on resume, which checkpoint to read it back from.

A mixin, so that the Trainer events and the `ExportableState` method stay on the callback where Trainer looks
for them, while the saving and finding is read in one place; what is saved is `mpopt_hf.callback.engine_state`'s.
"""

from __future__ import annotations

import os
from typing import Any

from transformers.trainer_callback import ExportableState

from ..config import MPOptArguments
from ..engine import RuleEngine
from .engine_state import (
    EngineCheckpoint,
    Loaded,
    check_trainer_state,
    checkpoint_folder,
    empty_entry,
)
from .gain_signal import GainSignal


class CheckpointedState(ExportableState):
    """Saves the engine's state with each checkpoint and finds it again on resume; the host class sets these."""

    engine: RuleEngine | None
    trainer: Any
    mpopt_args: MPOptArguments
    _gain: GainSignal
    _checkpoint: EngineCheckpoint  # race snapshots: "start" and "best", on the CPU
    _refs: tuple[Any, Any, Any] | None  # plain Trainer: the (args, state, control) last seen
    _resume_dir: str | None

    @property
    def _copies(self) -> dict[str, Any]:
        """The race's host copies ("start", "best"), held by `EngineCheckpoint`."""
        return self._checkpoint.copies

    @_copies.setter
    def _copies(self, value: dict[str, Any]) -> None:
        self._checkpoint.copies = value

    def resume_from(self, checkpoint_dir: str) -> None:
        """Called by MPOptTrainer before Trainer reads the checkpoint's state: a missing or truncated
        ``trainer_state.json`` (the engine's state is in it) fails here, naming the file and what to do, rather
        than as Trainer's bare error."""
        self._resume_dir = checkpoint_dir
        check_trainer_state(checkpoint_dir)

    def state(self) -> dict[str, Any]:
        """`ExportableState`: the engine's state, which Trainer saves in ``trainer_state.json`` (called while it
        saves a checkpoint, after the weights and before that file, and whenever it builds a `TrainerState`).

        Mid-race, the race's copies are written to the checkpoint folder now, before ``trainer_state.json``;
        their id is recorded here, so that resume can tell them from a stale or missing file."""
        if self.engine is None:
            return empty_entry()
        return self._checkpoint.entry(self.engine, self._gain.saved(), self._folder_being_saved)

    def on_save(self, args, state, control, **kwargs):
        # The copies are normally written by `state` already; this catches a save whose folder it could not tell.
        if self.engine is None or not self._copies or not args.should_save:
            return control
        folder = checkpoint_folder(args, state)
        if os.path.isdir(folder):
            self._checkpoint.save_copies(folder)
        return control

    def _folder_being_saved(self) -> str | None:
        """The checkpoint folder Trainer is writing, when `state` is called from its save (which runs while
        ``control.should_save`` holds, after the weights went to the folder), else None."""
        if self.trainer is not None:
            args, state, control = self.trainer.args, self.trainer.state, self.trainer.control
        elif self._refs is not None:
            args, state, control = self._refs
        else:
            return None
        if not (control.should_save and args.should_save):
            return None
        folder = checkpoint_folder(args, state)
        return folder if os.path.isdir(folder) else None

    def _load_saved(self, args: Any, state: Any) -> Loaded | None:
        """The saved state of the checkpoint this run resumes from (`EngineCheckpoint.load`); None when it
        starts afresh or the checkpoint holds none."""
        resume = self._resume_dir
        if resume is None and state.global_step > 0:  # a plain Trainer resumed: the folder follows the convention
            resume = checkpoint_folder(args, state)
        return None if resume is None else self._checkpoint.load(resume, state, type(self).__name__,
                                                                self.mpopt_args.strict_resume)
