"""One point of the memory-knob space.

A `MemoryConfig` says *how* a training step is run, never *what* is learned: two
configurations that differ only in their knobs give the same gradient for the
same effective batch (up to floating point), but different peak memory and
step time. That is what lets the engine switch between them online.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class MemoryConfig:
    """The memory-related hyperparameters of one training step."""

    micro_batch_size: int = field(
        metadata={
            "help": "Samples per forward/backward. The effective batch (what the data loader yields) is split into "
            "micro-batches of this size and their gradients are accumulated, so the effective batch is kept."
        }
    )
    freeze_rate: float = field(
        default=0.0,
        metadata={
            "help": "Share of the model's repeated blocks, counted from the input side, whose parameters are frozen "
            "(the stem/embeddings are frozen with them whenever the rate is above 0). The head always trains."
        },
    )
    checkpoint_segments: int = field(
        default=0,
        metadata={
            "help": "How many trainable blocks are activation-checkpointed, spread evenly over them; each "
            "checkpointed block keeps only its input and recomputes the rest in backward. 0 turns it off."
        },
    )
    precision: str = field(
        default="fp32",
        metadata={"help": f"Autocast precision, one of {PRECISIONS}. fp16 needs CUDA and uses a loss scaler."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.micro_batch_size, bool) or not isinstance(self.micro_batch_size, int):
            raise ValueError(
                f"MemoryConfig.micro_batch_size must be an int >= 1, got {self.micro_batch_size!r} "
                f"({type(self.micro_batch_size).__name__})."
            )
        if self.micro_batch_size < 1:
            raise ValueError(f"MemoryConfig.micro_batch_size must be an int >= 1, got {self.micro_batch_size}.")
        if isinstance(self.freeze_rate, bool) or not isinstance(self.freeze_rate, (int, float)):
            raise ValueError(f"MemoryConfig.freeze_rate must be a number in [0, 1], got {self.freeze_rate!r}.")
        if not 0.0 <= float(self.freeze_rate) <= 1.0:
            raise ValueError(f"MemoryConfig.freeze_rate must be in [0, 1], got {self.freeze_rate}.")
        object.__setattr__(self, "freeze_rate", float(self.freeze_rate))
        if isinstance(self.checkpoint_segments, bool) or not isinstance(self.checkpoint_segments, int):
            raise ValueError(
                f"MemoryConfig.checkpoint_segments must be an int >= 0 (0 = off), got {self.checkpoint_segments!r}."
            )
        if self.checkpoint_segments < 0:
            raise ValueError(
                f"MemoryConfig.checkpoint_segments must be an int >= 0 (0 = off), got {self.checkpoint_segments}."
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"MemoryConfig.precision must be one of {list(PRECISIONS)}, got {self.precision!r}.")

    def replace(self, **changes: Any) -> "MemoryConfig":
        """A copy with some fields changed (validated again)."""
        return MemoryConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MemoryConfig got unknown field(s) {unknown}; allowed fields are {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MemoryConfig":
        return cls.from_dict(json.loads(text))

    def short(self) -> str:
        """A compact label for tables and logs, e.g. ``mb8/f0.50/ckpt2/bf16``."""
        return f"mb{self.micro_batch_size}/f{self.freeze_rate:.2f}/ckpt{self.checkpoint_segments}/{self.precision}"
