"""The engine's decisions as a person and a tracker see them: a log line and a Trainer ``log`` entry for each
decision as it is taken, and the whole list in ``decisions.json`` at the end of training.

Kept apart from `MPOptCallback`, which only says when to flush: what a decision looks like outside is one job.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import MemoryConfig
from ..engine import MIB, Decision

logger = logging.getLogger(__name__)

DECISIONS_FILE = "decisions.json"


def decision_entry(decision: Decision, index: int, trainer: Any, gain_per: str = "second") -> dict[str, Any]:
    """The Trainer ``log`` entry of one decision (``index``: its place in the engine's list; ``gain_per``: the
    unit of its gain estimate, the engine's)."""
    d = decision
    entry = {
        "mpopt/micro_batch_size": d.config["micro_batch_size"],
        "mpopt/freeze_rate": d.config["freeze_rate"],
        "mpopt/checkpoint_segments": d.config["checkpoint_segments"],
        "mpopt/decision": index,
    }
    if d.budget_bytes is not None:
        entry["mpopt/budget_mib"] = round(d.budget_bytes / MIB, 2)
    config = MemoryConfig.from_dict(d.config)
    if config.selective:  # logs are numbers: flags for the knobs that are on
        entry["mpopt/selective_checkpointing"] = 1
    if config.optimizer_state == "8bit":
        entry["mpopt/optimizer_state_bits"] = 8
    if config.lora_rank:
        entry["mpopt/lora_rank"] = config.lora_rank
    if config.batch_size is not None:  # the batch as a knob: the update's batch and learning rate
        entry["mpopt/update_batch_size"] = config.batch_size
        entry["mpopt/learning_rate_scale"] = trainer.learning_rate_scale(config)
    if d.predicted_peak_bytes is not None:
        entry["mpopt/predicted_peak_mib"] = round(d.predicted_peak_bytes / MIB, 2)
    if d.gain_estimate is not None:
        entry["mpopt/gain_per_s" if gain_per == "second" else "mpopt/gain_per_step"] = d.gain_estimate
    return entry


@dataclass
class DecisionLog:
    """Which of the engine's decisions were logged already (on resume: those the first run logged)."""

    logged: int = 0

    def flush(self, decisions: Sequence[Decision], trainer: Any = None, gain_per: str = "second") -> None:
        """Log the decisions not yet logged, and through ``trainer.log`` (when there is one), so trackers see them."""
        new = list(decisions[self.logged :])
        self.logged = len(decisions)
        for d in new:
            logger.info("mpopt decision at step %d [%s/%s]: %s (%s)", d.step, d.kind, d.outcome,
                        MemoryConfig.from_dict(d.config).short(), d.reason)
            if trainer is not None:
                # Trainer.log's on_log resets control.should_log: a step's own loss row, already due, must still come
                control = getattr(trainer, "control", None)
                due = bool(getattr(control, "should_log", False))
                trainer.log(decision_entry(d, len(decisions) - len(new) + new.index(d), trainer, gain_per))
                if due:
                    control.should_log = True

    @staticmethod
    def write(output_dir: str, decisions: Sequence[Decision]) -> None:
        """All decisions, as ``decisions.json`` in ``output_dir``."""
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, DECISIONS_FILE), "w") as f:
            json.dump([d.to_dict() for d in decisions], f, indent=1)
