"""Which blocks a configuration freezes and checkpoints: pure arithmetic on the block count, with no torch import,
so the engine's search space counts frozen blocks exactly as the knobs apply them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import MemoryConfig


@dataclass(frozen=True)
class KnobPlan:
    """Which blocks a configuration freezes and checkpoints (pure arithmetic on the block count)."""

    n_blocks: int
    n_frozen: int
    checkpointed: tuple[int, ...]
    selective: bool = False  # the checkpointed blocks keep their matmul outputs (config.checkpoint_policy)

    @property
    def n_trainable(self) -> int:
        return self.n_blocks - self.n_frozen

    @property
    def stem_frozen(self) -> bool:
        return self.n_frozen > 0


def n_frozen_blocks(freeze_rate: float, n_blocks: int) -> int:
    """``round(rate x n_blocks)``, halves rounded up so the count is predictable (no banker's rounding)."""
    return min(n_blocks, int(math.floor(freeze_rate * n_blocks + 0.5)))


def plan_knobs(config: MemoryConfig, n_blocks: int) -> KnobPlan:
    """Freeze the first ``round(rate x n)`` blocks; checkpoint ``segments`` of the rest, spread evenly.

    The checkpointed blocks are the trainable ones at positions ``floor(i x trainable / segments)``,
    which is exactly what ``every_n_layers = trainable / segments`` selects when it divides.
    """
    if n_blocks < 1:
        raise ValueError(f"The model has no blocks to plan for (n_blocks={n_blocks}).")
    n_frozen = n_frozen_blocks(config.freeze_rate, n_blocks)
    trainable = n_blocks - n_frozen
    if config.checkpoint_segments > trainable:
        raise ValueError(
            f"MemoryConfig.checkpoint_segments={config.checkpoint_segments} exceeds the {trainable} trainable blocks "
            f"(the model has {n_blocks} blocks and freeze_rate={config.freeze_rate} freezes {n_frozen}); "
            f"allowed: 0..{trainable}."
        )
    segments = config.checkpoint_segments
    checkpointed = tuple(n_frozen + (i * trainable) // segments for i in range(segments)) if segments else ()
    return KnobPlan(n_blocks=n_blocks, n_frozen=n_frozen, checkpointed=checkpointed, selective=config.selective)


__all__ = ["KnobPlan", "n_frozen_blocks", "plan_knobs"]
