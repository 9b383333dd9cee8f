"""One point of the memory-knob space.

A `MemoryConfig` says *how* a training step is run, never *what* is learned: two
configurations that differ only in their knobs give the same gradient for the
same effective batch (up to floating point), but different peak memory and
step time. That is what lets the engine switch between them online.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
# How a checkpointed block saves for backward: "block" keeps only its input and recomputes everything;
# "selective" also keeps the outputs of its matmuls, convolutions and attention (the costly ops) and
# recomputes the cheap rest, so it sits between no checkpointing and whole-block checkpointing.
CHECKPOINT_POLICIES = ("block", "selective")
# How AdamW holds its two moments: 32-bit floats, or bitsandbytes' blockwise 8 bits (`optimizer_state`).
OPTIMIZER_STATES = ("fp32", "8bit")


from .validation import (
    InvalidTypeError,
    check_choice,
    check_int,
    check_number,
    described,
)


def check_budget(where: str, value: Any) -> float | str | Callable[[], float] | None:
    """A memory budget: None, a finite number of MiB > 0 (also as a string, from a flag), 'auto' or a callable."""
    if value is None or value == "auto" or callable(value):
        return value
    allowed = "> 0 MiB (a finite number), 'auto', a callable returning bytes, or None"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where} must be {allowed}, got {value!r}.") from None
    return check_number(where, value, lambda v: v > 0, allowed)


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
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Samples per optimizer update (per device), when smaller than the loader's batch: each "
                  "loader batch is then split into updates of this many samples, every sample used once. Unlike the "
                  "other knobs it changes what is learned (opt in through MPOptArguments.effective_batch_sizes). "
                  "None: the loader's batch."},
    )

    checkpoint_policy: str = field(
        default="block",
        metadata={"help": f"How the checkpointed blocks recompute, one of {CHECKPOINT_POLICIES}: 'block' keeps only "
                  "each block's input; 'selective' also keeps its matmul, convolution and attention outputs and "
                  "recomputes the rest (more memory than 'block', less recomputation). Only matters with "
                  "checkpoint_segments > 0."},
    )
    optimizer_state: str = field(
        default="fp32",
        metadata={"help": f"How AdamW keeps its moments, one of {OPTIMIZER_STATES}: '8bit' holds them in "
                  "bitsandbytes' blockwise 8 bits (about 2 instead of 8 bytes per trained parameter; tensors under "
                  "4096 elements stay 32-bit), converted in place when switched, so the moments are kept. Needs "
                  "bitsandbytes and torch's AdamW. Label part: 'opt8'."},
    )
    lora_rank: int = field(
        default=0,
        metadata={"help": "LoRA adapters of this rank (peft) on every Linear layer of the blocks that freeze_rate leaves "
                  "trainable; those layers' own weights and biases are then frozen, the blocks' other parameters "
                  "(norms) and the head train as before. A switch merges the adapters into the weights first, so "
                  "what they learned is kept. Like batch_size it changes what is learned (opt in through "
                  "MPOptArguments.lora_ranks). 0: off. Label part: 'lora8'."},
    )

    def __post_init__(self) -> None:
        # type errors raise InvalidTypeError (a TypeError and a ValueError), range errors ValueError
        set_ = object.__setattr__  # frozen: normalise through object.__setattr__ (numpy ints -> int, ints -> float)
        set_(self, "micro_batch_size",
             check_int("MemoryConfig.micro_batch_size", self.micro_batch_size, lambda v: v >= 1, "an int >= 1"))
        set_(self, "freeze_rate",
             check_number("MemoryConfig.freeze_rate", self.freeze_rate, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"))
        set_(self, "checkpoint_segments", check_int("MemoryConfig.checkpoint_segments", self.checkpoint_segments,
                                                    lambda v: v >= 0, "an int >= 0 (0 = off)"))
        check_choice("MemoryConfig.precision", self.precision, PRECISIONS)
        set_(self, "batch_size", check_int("MemoryConfig.batch_size", self.batch_size, lambda v: v >= 1,
                                           "an int >= 1 or None", optional=True))
        check_choice("MemoryConfig.checkpoint_policy", self.checkpoint_policy, CHECKPOINT_POLICIES)
        if self.checkpoint_segments == 0:  # nothing checkpointed: the policy is moot, and one such config is enough
            set_(self, "checkpoint_policy", "block")
        check_choice("MemoryConfig.optimizer_state", self.optimizer_state, OPTIMIZER_STATES)
        set_(self, "lora_rank", check_int("MemoryConfig.lora_rank", self.lora_rank, lambda v: v >= 0,
                                          "an int >= 0 (0 = off)"))

    def replace(self, **changes: Any) -> "MemoryConfig":
        """A copy with some fields changed (validated again)."""
        return MemoryConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping):
            raise InvalidTypeError(f"MemoryConfig.from_dict expects a dict of the fields {sorted(known)}, "
                                   f"got {described(data)}.")
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
        policy = "s" if self.checkpoint_policy == "selective" else ""
        text = f"mb{self.micro_batch_size}/f{self.freeze_rate:.2f}/ckpt{self.checkpoint_segments}{policy}/{self.precision}"
        text += "/opt8" if self.optimizer_state == "8bit" else ""
        text += f"/lora{self.lora_rank}" if self.lora_rank else ""
        return text if self.batch_size is None else f"bs{self.batch_size}/{text}"

    @property
    def selective(self) -> bool:
        """True when some block is checkpointed selectively (the policy is moot without checkpointing)."""
        return self.checkpoint_policy == "selective" and self.checkpoint_segments > 0

    @property
    def frozenness(self) -> tuple[float, float]:
        """How much of the model this configuration holds fixed, for "the least frozen" (what the engine prefers
        when candidates tie): the freeze rate, then LoRA (full training 0, a lower rank holds more fixed)."""
        return (self.freeze_rate, 1.0 / self.lora_rank if self.lora_rank else 0.0)

    @property
    def step_micro_batch(self) -> int:
        """The micro-batch a step really runs: never more than its update's batch."""
        return self.micro_batch_size if self.batch_size is None else min(self.micro_batch_size, self.batch_size)

    def without_batch(self) -> "MemoryConfig":
        """The same step on the loader's whole batch: what a cost model prices (the batch knob adds only
        optimizer updates, not memory)."""
        if self.batch_size is None:
            return self
        return self.replace(batch_size=None, micro_batch_size=self.step_micro_batch)

    @classmethod
    def parse(cls, text: str) -> "MemoryConfig":
        """The inverse of `short`, for flags: ``mb8/f0.5/ckpt2/bf16``; every part but ``mb`` may be left out.

        Each part may appear once (``mb8/bf16/fp32`` is refused: two precisions)."""
        if not isinstance(text, str):
            raise InvalidTypeError(f"MemoryConfig.parse expects a str such as 'mb8/f0.5/ckpt2/bf16', got {described(text)}.")
        values: dict[str, Any] = {}
        prefixes = (("mb", "micro_batch_size", int), ("ckpt", "checkpoint_segments", int), ("bs", "batch_size", int),
                    ("lora", "lora_rank", int), ("f", "freeze_rate", float))
        for part in filter(None, text.strip().split("/")):
            if part.startswith("ckpt") and part.endswith("s") and "checkpoint_policy" not in values:
                values["checkpoint_policy"], part = "selective", part[:-1]  # 'ckpt2s': two blocks, selectively
            if part in ("opt8", "opt32") and "optimizer_state" not in values:
                values["optimizer_state"] = "8bit" if part == "opt8" else "fp32"
                continue
            if part in PRECISIONS:
                if "precision" in values:
                    raise ValueError(
                        f"The memory configuration {text!r} names two precisions ({values['precision']!r} and "
                        f"{part!r}); give one of {list(PRECISIONS)}."
                    )
                values["precision"] = part
                continue
            match = next(((name, kind, part[len(p):]) for p, name, kind in prefixes if part.startswith(p)), None)
            try:
                if match is None or match[0] in values:
                    raise ValueError
                values[match[0]] = match[1](match[2])
            except ValueError:
                raise ValueError(
                    f"Cannot read {part!r} in the memory configuration {text!r}: expected parts like 'mb8/f0.5/ckpt2/bf16' "
                    f"(micro-batch, freeze rate, checkpoint segments with an 's' for selective, one of "
                    f"{list(PRECISIONS)}; optionally 'bs16', the batch per update, 'opt8', 8-bit optimizer "
                    "state, and 'lora8', LoRA adapters of rank 8), 'mb' required."
                ) from None
        if "micro_batch_size" not in values:
            raise ValueError(f"The memory configuration {text!r} has no micro-batch size: start it with e.g. 'mb8'.")
        try:
            return cls(**values)
        except ValueError as err:  # a part read as a number but out of range, e.g. 'mb0' or 'f1.5'
            raise type(err)(f"In the memory configuration {text!r}: {err}") from None
